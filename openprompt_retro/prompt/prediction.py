"""Prediction on lists of InputExamples, on the model itself (SetFit's split: the model predicts and
explains, :class:`~openprompt_retro.prompt.trainer.RetroTrainer` trains).

:class:`Prediction` is a mixin of :class:`RetroPromptForClassification`: the model keeps its tokenizer
(the template's), OpenPrompt tokenizer-wrapper class and max length - given at construction, by
:meth:`Prediction.set_tokenization` (RetroTrainer calls it), or inferred from the PLM - so a model from
``from_pretrained(dir)`` predicts with nothing else.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.knn import knn_label_distribution, knn_weights, mix
from .checks import check_labels, check_texts, check_top, label_words_of
from .store_builder import tokenizing_bar


def default_wrapper_class(plm):
    """OpenPrompt's tokenizer-wrapper class for this PLM (what ``load_plm`` returns), or None if unknown."""
    from openprompt.plms import _MODEL_CLASSES

    from .saved_run import infer_model_type

    model_type = infer_model_type(plm)
    return _MODEL_CLASSES[model_type].wrapper if model_type else None


def position_limit(plm) -> Optional[int]:
    """How many tokens ``plm`` can read (max_position_embeddings, less RoBERTa's padding offset), or None."""
    config = getattr(plm, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
        n -= int(getattr(config, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
    return n


class Prediction:
    """predict_proba / predict / explain / add_examples on InputExamples, for RetroPromptForClassification."""

    def set_tokenization(self, wrapper_class=None, max_seq_length: Optional[int] = None, tokenizer=None) -> None:
        """How examples are tokenized: OpenPrompt's wrapper class, max length, tokenizer (default: the template's)."""
        if wrapper_class is not None:
            self.wrapper_class = wrapper_class
        if max_seq_length is not None:
            if int(max_seq_length) < 1:
                raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
            limit = position_limit(self.plm)
            if limit is not None and int(max_seq_length) > limit:
                raise ValueError(f"max_seq_length {max_seq_length} is above what {type(self.plm).__name__} can read: "
                                 f"{limit} positions (its max_position_embeddings); use {limit} or less")
            self.max_seq_length = int(max_seq_length)
        if tokenizer is not None:
            self.example_tokenizer = tokenizer

    def loader(self, examples, batch_size: int = 32, shuffle: bool = False, split: str = "data",
               require_labels: bool = False, progress: bool = False):
        """A PromptDataLoader of ``examples`` (labels and texts checked first, each bad one named)."""
        from openprompt import PromptDataLoader

        examples = list(examples)
        if len(examples) == 0:
            raise ValueError(f"{split}: no examples given")
        if self.wrapper_class is None:
            raise ValueError("the model does not know its tokenizer wrapper class (the PLM is not one of "
                             "OpenPrompt's): call model.set_tokenization(wrapper_class) with what load_plm returned")
        check_labels(examples, self.num_classes, split, require_labels, label_words_of(self))
        check_texts(examples, split)
        tokenizer = self.example_tokenizer or self.template.tokenizer
        with tokenizing_bar(progress):
            return PromptDataLoader(examples, self.template, tokenizer=tokenizer,
                                    tokenizer_wrapper_class=self.wrapper_class, max_seq_length=self.max_seq_length,
                                    batch_size=batch_size, shuffle=shuffle, truncate_method="tail")

    @torch.no_grad()
    def predict_proba(self, data, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """P(y|x) for each example (InputExamples or a PromptDataLoader), kNN-mixed with the current lambda;
        float32, rows sum to 1."""
        from openprompt import PromptDataLoader

        loader = data if isinstance(data, PromptDataLoader) else self.loader(data, batch_size, progress=progress)
        self.eval()
        device = next(self.parameters()).device
        out = []
        for b in tqdm(loader, desc="predict", leave=False, disable=not progress):
            log_p = self(b.to(device) if hasattr(b, "to") else b)
            out.append(torch.exp(log_p.float()).cpu().numpy())
        return np.concatenate(out)

    def predict(self, data, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """The most probable class of each example: argmax of :meth:`predict_proba`."""
        return self.predict_proba(data, batch_size, progress).argmax(-1)

    def explain(self, example, top: int = 5) -> Dict:
        """The prediction for one InputExample and the neighbours behind it (text, label, weight)."""
        if isinstance(example, (list, tuple)):
            raise TypeError(f"explain takes one InputExample, got a {type(example).__name__} of {len(example)}: "
                            "call it for each example ([model.explain(e) for e in examples])")
        check_top(top)
        loader = self.loader([example], batch_size=1)  # kept alive: a key encoder reads the example through it
        batch = next(iter(loader))
        device = next(self.parameters()).device
        return self.explain_batch(batch.to(device) if hasattr(batch, "to") else batch, top=top)[0]

    def add_examples(self, examples, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Add labeled examples to the store now; later predictions use them (no retraining). Returns their ids."""
        loader = self.loader(examples, batch_size, split="added", require_labels=True, progress=progress)
        return self.add_to_store(loader, progress=progress)

    def knn_probs(self, query, exclude_ids=None, k: Optional[int] = None,
                  temperature: Optional[float] = None) -> torch.Tensor:
        """p_kNN(y|x) for query keys by the config's read-out and score scale (k, T default to the inference
        ones: ``knn_temperature`` for top-k, ``class_mean_temperature`` for the class-mean read-out)."""
        if hasattr(exclude_ids, "detach"):
            exclude_ids = exclude_ids.detach().cpu()
        p = self.knn_distribution(query.detach().float().cpu().numpy(), k, temperature, exclude_ids)
        return torch.from_numpy(p).to(query.device)

    def knn_distribution(self, queries, k: Optional[int] = None, temperature: Optional[float] = None,
                         exclude_ids=None) -> np.ndarray:
        """p_kNN(y|x) for numpy query keys by the config's read-out and score scale: the distribution inference
        mixes in, so lambda is tuned on dev against exactly what the model will use (T defaults as in
        :meth:`knn_probs`; the class-mean read-out ignores k)."""
        c = self.config
        return self.lifecycle.knn_distribution(np.asarray(queries, dtype=np.float32), exclude_ids, k or c.knn_k,
                                               temperature or c.readout_temperature(), c.readout,
                                               c.knn_score_scale, c.class_mean_top_m)

    @torch.no_grad()
    def plm_probs_and_queries(self, batch):
        """(p_PLM, query keys) for a batch, without the kNN mixture - used to tune lambda, k and T."""
        logits, query = self.forward_with_keys(self.prepare_batch(batch, need_query=True), mix=False)
        return torch.softmax(logits, -1), query

    @torch.no_grad()
    def explain_batch(self, batch, top: int = 5) -> List[Dict]:
        """For each example: prediction, p_PLM, p_kNN and the neighbours behind p_kNN.

        The k = ``config.knn_k`` nearest entries carry the weights of p_kNN,
        w_j = softmax_j(z_j / T) over those k, z the scores on ``config.knn_score_scale``
        (:func:`~openprompt_retro.core.knn.knn_weights`, the function behind p_kNN);
        the ``top`` best of them are listed with these weights (not renormalised over
        the listed ones, so they sum to at most 1). With the class-mean or logistic read-out p_kNN
        comes from each class's mean key or the fitted regression instead; the neighbours and their
        weights still show which entries the query is nearest.
        """
        check_top(top)
        was = self.training
        self.eval()
        try:
            p_plm, query = self.plm_probs_and_queries(batch)
            exclude = self.lifecycle.own_ids(batch, training=False) if self.exclude_self_in_eval else None
            c, store = self.config, self.knn_store
            k, t, scale = c.knn_k, c.knn_temperature, c.knn_score_scale
            res = store.search(query.float().cpu(), k, exclude)
            weights = knn_weights(res.scores, t, res.labels >= 0, scale)
            if c.readout == "topk":
                p_knn = torch.from_numpy(knn_label_distribution(res.scores, res.labels, self.num_classes, t,
                                                                scale)).to(p_plm)
            else:
                p_knn = torch.from_numpy(self.knn_distribution(query.float().cpu().numpy(), exclude_ids=exclude)
                                         ).to(p_plm)
            if c.plm_temperature != 1.0:
                p_plm = torch.softmax(torch.log(p_plm.clamp_min(1e-12)) / c.plm_temperature, -1)
            p = mix(p_plm, p_knn, self.effective_lambda)
            out = []
            for i in range(query.shape[0]):
                out.append({
                    "prediction": int(p[i].argmax()), "probs": p[i].tolist(),
                    "p_plm": p_plm[i].tolist(), "p_knn": p_knn[i].tolist(),
                    "neighbours": [{"id": int(j), "guid": store.guids[j], "text": store.texts[j],
                                    "label": int(store.labels[j]), "score": float(s), "weight": float(wj)}
                                   for j, s, wj in list(zip(res.ids[i], res.scores[i], weights[i]))[:top] if j >= 0],
                })
            return out
        finally:
            self.train(was)

