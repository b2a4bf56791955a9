"""RetroTemplate: any OpenPrompt template plus a demonstration segment.

Neural demonstrations (``demonstrations="neural"``) append one slot per class,

    <s> x It was <mask>. </s> [d_0] terrible [d_1] great </s>

and :meth:`RetroTemplate.process_batch` replaces the input embedding of each
placeholder ``[d_c]`` by the vector d_c that the model retrieved for this
example (``batch["retro_demo_embeds"]``, shape (B, C, D)).

Text demonstrations (``demonstrations="text"``, LM-BFF) append, for each
class, the most similar labeled example wrapped by the same template with its
label word in place of ``<mask>``.

The whole segment can be hidden (``demonstrations_enabled = False``): every
position from its first token to the end gets attention mask 0, so what stays
visible is token for token, position for position, the input without
demonstrations. That pass gives the store keys and the queries.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import warnings
import weakref

import torch
from openprompt.prompt_base import Template

from . import loaders, patches
from .batch import DEMO_KEY, SEGMENT_KEY, SLOT_KEY, batch_get
from .text_demos import EncoderDemoRetriever, PoolDemoRetriever, TfidfDemoRetriever
from .wrapping import PassThroughToBase

MODES = ("neural", "text", "none")


def _verbalizer_words(verbalizer) -> Optional[List[str]]:
    """The first label word of each class (else the class names), or None if the verbalizer has neither."""
    try:
        words = verbalizer.label_words
    except (RuntimeError, AttributeError):
        words = None
    if words:
        return [w if isinstance(w, str) else w[0] for w in words]
    classes = getattr(verbalizer, "classes", None)
    if classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    return None


class RetroTemplate(PassThroughToBase, Template):
    """Wrap ``base`` (ManualTemplate, MixedTemplate, SoftTemplate, ...) with demonstrations.

    Args:
        base: the OpenPrompt template that formats the query.
        label_words: one word per class, shown after each demonstration. Optional:
            ``RetroPromptForClassification`` fills them in from its verbalizer; a
            PromptDataLoader built before that is tokenized when they come.
        demonstrations: ``"neural"``, ``"text"`` or ``"none"``.
        plm: the PLM whose input embeddings the neural slots replace (optional:
            ``RetroPromptForClassification`` fills it in).
        text_pool / text_retriever: labeled examples to draw text demonstrations
            from (TF-IDF similarity), or any callable example -> [(class, example)].
        placeholder: the token whose embedding each slot replaces (default: unk).

    Every attribute and method of ``base`` that this class does not define is
    reachable through it (``soft_embeds``, ``num_tokens``, ``raw_embedding``, ...).
    """

    def __init__(self, base: Template, label_words: Optional[Sequence[Union[str, Sequence[str]]]] = None,
                 demonstrations: str = "neural", plm: Optional[torch.nn.Module] = None,
                 text_pool: Optional[Sequence] = None,
                 text_retriever: Optional[Callable] = None, placeholder: Optional[str] = None):
        if demonstrations not in MODES:
            raise ValueError(f"demonstrations must be one of {MODES}, got {demonstrations!r}")
        if not isinstance(base, Template):
            raise TypeError(f"base must be an OpenPrompt Template, got {type(base).__name__}")
        if isinstance(base, RetroTemplate):
            raise TypeError("base is already a RetroTemplate; wrap the OpenPrompt template once")
        patches.install()
        super().__init__(tokenizer=base.tokenizer, placeholder_mapping=base.placeholder_mapping)
        self.base = base
        self.label_words: Optional[List[str]] = None
        self.num_classes: Optional[int] = None
        self.demonstrations = demonstrations
        self.demonstrations_enabled = True
        self._plm = [plm]
        self._deferred: List[weakref.ref] = []  # loaders waiting for the label words
        self.placeholder = None
        if demonstrations == "neural":
            self.placeholder = placeholder or self.tokenizer.unk_token
            ids = self.tokenizer.encode(self.placeholder, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"placeholder {self.placeholder!r} must be one token, got {len(ids)}")
        self.text_retriever = text_retriever
        self.text_encoder = None  # set_text_encoder: pool demonstrations by encoder keys instead of TF-IDF
        self._wrapped_by_tfidf = False  # examples were wrapped with TF-IDF demonstrations (see set_text_encoder)
        self._text_pool = text_pool if demonstrations == "text" and text_retriever is None else None
        if label_words is not None:
            self.set_label_words(label_words)

    # --------------------------------------------------------------- plumbing
    @property
    def text(self):
        return self.base.text

    @text.setter
    def text(self, value):  # Template.__init__ never sets it; users set the base's text
        if value is not None:
            self.base.text = value

    def on_text_set(self):
        pass

    @property
    def registered_inputflag_names(self) -> List[str]:
        return list(self.base.registered_inputflag_names)

    def set_label_words(self, label_words: Sequence[Union[str, Sequence[str]]]) -> None:
        """One label word per class (the first of each list is shown after the class's demonstration).

        Surrounding spaces are dropped (verbalizers store " great"; the template adds the space itself).
        """
        words = [(w if isinstance(w, str) else w[0]).strip() for w in label_words]
        if not words:
            raise ValueError("label_words is empty: give one label word per class")
        self.label_words, self.num_classes = words, len(words)
        if self._text_pool is not None:
            self.set_text_pool(self._text_pool)
        deferred, self._deferred = self._deferred, []
        for ref in deferred:
            if ref() is not None:
                loaders.build_deferred(ref())

    @property
    def waits_for_label_words(self) -> bool:
        """Whether inputs cannot be wrapped yet: the demonstrations show label words and none were given."""
        return self.demonstrations != "none" and self.label_words is None

    def defer(self, loader) -> None:
        """Tokenize ``loader`` (a PromptDataLoader built with this template) once the label words are set."""
        self._deferred.append(weakref.ref(loader))

    def take_from(self, verbalizer, plm) -> None:
        """Take the verbalizer's label words (if this template has none) and the PLM; check the class counts."""
        n = int(verbalizer.num_classes)
        if self.label_words is None:
            words = _verbalizer_words(verbalizer)
            if words is not None:
                self.set_label_words(words)
            elif self.demonstrations != "none":
                raise ValueError(f"RetroTemplate(demonstrations={self.demonstrations!r}) shows a label word per "
                                 "class, and the verbalizer has none (e.g. SoftVerbalizer without label_words): "
                                 "pass label_words=[...] to RetroTemplate")
        if self.label_words is not None and self.num_classes != n:
            raise ValueError(f"RetroTemplate has {self.num_classes} label words {self.label_words} but the "
                             f"verbalizer has {n} classes: give one label word per class")
        if self._plm[0] is None:
            self.set_plm(plm)

    def set_plm(self, plm: torch.nn.Module) -> None:
        self._plm[0] = plm

    def set_text_pool(self, pool: Sequence) -> None:
        """Draw text demonstrations from these labeled examples (TF-IDF similarity, or the keys of the encoder
        given to :meth:`set_text_encoder`)."""
        if self.num_classes is None:  # built once the label words (hence the classes) are known
            self._text_pool = pool
            return
        self._text_pool = None
        if self.text_encoder is not None:
            self.text_retriever = EncoderDemoRetriever(pool, self.num_classes, self.text_encoder)
        else:
            self.text_retriever = TfidfDemoRetriever(pool, self.num_classes)

    def set_text_encoder(self, encoder) -> None:
        """Choose the text demonstrations of a pool by ``encoder``'s keys (``encode(examples)``, unit length)
        instead of TF-IDF; a retriever given as ``text_retriever`` is kept as it is.

        A PromptDataLoader wraps its examples when it is built: one built before this call keeps the TF-IDF
        demonstrations it drew, and a warning says so."""
        if self._wrapped_by_tfidf and isinstance(self.text_retriever, TfidfDemoRetriever):
            warnings.warn("RetroTemplate: examples were already wrapped with TF-IDF text demonstrations; from now "
                          "on the key encoder chooses them, and PromptDataLoaders built before this keep the TF-IDF "
                          "ones: build the loaders after RetroPromptForClassification", stacklevel=2)
        self.text_encoder = encoder
        if isinstance(self.text_retriever, PoolDemoRetriever):
            self.set_text_pool(self.text_retriever.pool)

    # --------------------------------------------------------------- wrapping
    def _piece(self, flags, text, slot=0):
        piece = {"text": text, **{f: 0 for f in flags}}
        piece[SLOT_KEY], piece[SEGMENT_KEY] = slot, 1
        return piece

    def wrap_one_example(self, example):
        """The base template's wrapping of ``example``, then its demonstration segment. Before the label words
        are known (the model takes them from its verbalizer) there is no segment yet: the query alone, as
        OpenPrompt's tutorials print it right after building the template. PromptDataLoaders built then wait
        for the words (:meth:`defer`) and never see this form."""
        parts, others = self.base.wrap_one_example(example)
        flags = [k for k in parts[0] if k != "text"]
        for p in parts:
            p[SLOT_KEY], p[SEGMENT_KEY] = 0, 0
        if self.demonstrations == "none":
            return [parts, others]
        if self.label_words is None:  # e.g. a tutorial printing an example right after building the template:
            return [parts, others]      # the query as it is (loaders wait for the words; see defer)
        # "<s> query </s>" stays exactly as without demonstrations; the segment follows it
        sep = self._piece(flags, "<sep>")
        sep[SEGMENT_KEY] = 0
        if self.demonstrations == "neural":
            parts.append(sep)
            for c, word in enumerate(self.label_words):
                parts.append(self._piece(flags, " " + self.placeholder, slot=c + 1))
                parts.append(self._piece(flags, " " + word))
        else:
            if self.text_retriever is None:
                raise ValueError("text demonstrations need a pool: pass text_pool=... or call set_text_pool()")
            self._wrapped_by_tfidf |= isinstance(self.text_retriever, TfidfDemoRetriever)
            for i, (c, demo) in enumerate(self.text_retriever(example)):
                parts.append(self._piece(flags, "<sep>") if i else sep)
                demo_parts, _ = self.base.wrap_one_example(demo)
                for p in demo_parts:
                    if p.get("loss_ids") == 1:  # the demo shows its label word where the query has <mask>
                        p["text"], p["loss_ids"] = " " + self.label_words[c], 0
                    p[SLOT_KEY], p[SEGMENT_KEY] = 0, 1
                    parts.append(p)
        return [parts, others]

    # --------------------------------------------------------------- batches
    def process_batch(self, batch):
        slots, segment = batch_get(batch, SLOT_KEY), batch_get(batch, SEGMENT_KEY)
        demos = batch_get(batch, DEMO_KEY)
        if segment is None and self.demonstrations != "none":
            raise ValueError(f"this batch has no demonstration segment (no '{SEGMENT_KEY}'): its PromptDataLoader "
                             "was built with the template that RetroTemplate wraps, so the demonstrations would be "
                             "dropped; build the PromptDataLoader with the RetroTemplate itself")
        batch = self.base.process_batch(batch)
        if segment is None or self.demonstrations == "none" or not bool((segment == 1).any()):
            return batch  # no demonstration token in the batch (e.g. cut off): the plain input
        if not self.demonstrations_enabled:
            # hide everything from the segment's first token on (the closing </s> too)
            am = batch["attention_mask"]
            off = am.shape[1] - segment.shape[1]  # SoftTemplate prepends its soft tokens
            keep = torch.ones_like(am)
            keep[:, off:] = ((segment == 1).cumsum(1) == 0).to(am.dtype)
            batch["attention_mask"] = am * keep
            return batch
        if self.demonstrations != "neural":
            return batch
        if demos is None:
            raise ValueError(f"neural demonstrations need batch['{DEMO_KEY}'] of shape (B, C, D): run the batch "
                             "through RetroPromptForClassification, or set demonstrations_enabled = False")
        embeds = batch_get(batch, "inputs_embeds")
        if embeds is None:
            if self._plm[0] is None:
                raise ValueError("neural demonstrations need the PLM's input embeddings: pass plm=... to "
                                 "RetroTemplate or use it inside RetroPromptForClassification")
            embeds = self._plm[0].get_input_embeddings()(batch["input_ids"])
        off = embeds.shape[1] - slots.shape[1]
        is_slot = slots > 0
        b, pos = torch.nonzero(is_slot, as_tuple=True)
        fill = torch.zeros_like(embeds)
        fill[b, pos + off] = demos.to(embeds.device, embeds.dtype)[b, slots[b, pos] - 1]
        mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        mask[b, pos + off] = True
        batch["inputs_embeds"] = torch.where(mask.unsqueeze(-1), fill, embeds)
        batch["input_ids"] = None
        return batch

    def post_processing_outputs(self, outputs):
        return self.base.post_processing_outputs(outputs)
