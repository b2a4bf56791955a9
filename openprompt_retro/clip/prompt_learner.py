"""CoOp prompt learner: learnable context vectors before the class name, on a frozen CLIP.

    prompt_c = [SOS] [v_1] ... [v_n] [CLASS_c] . [EOS]

The prompts are tokenized once with n placeholder words ("X"); at each
forward the token embeddings of those positions are replaced by the context
vectors, and CLIP's own text transformer (positions, causal attention, final
norm, EOS pooling, projection) does the rest.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .features import as_features


class CoOpPromptLearner(nn.Module):
    """Args:
        clip_model, tokenizer: a (frozen) transformers ``CLIPModel`` and its tokenizer.
        classnames: one name per class.
        n_ctx: number of context vectors (ignored when ``ctx_init`` is given).
        ctx_init: e.g. ``"a photo of a"``: initialise the context from these words' embeddings.
        class_specific: one context per class instead of one shared context.
    """

    def __init__(self, clip_model, tokenizer, classnames: Sequence[str], n_ctx: int = 16,
                 ctx_init: Optional[str] = None, class_specific: bool = False, seed: int = 0):
        super().__init__()
        self._clip = [clip_model]  # a reference, not a submodule: only the context is this module's
        token_embedding = clip_model.text_model.embeddings.token_embedding
        dim = token_embedding.weight.shape[1]
        if ctx_init:
            init_ids = tokenizer(ctx_init, add_special_tokens=False)["input_ids"]
            n_ctx = len(init_ids)
            with torch.no_grad():
                init = token_embedding(torch.tensor(init_ids)).clone()
        else:
            gen = torch.Generator().manual_seed(seed)
            init = torch.randn(n_ctx, dim, generator=gen) * 0.02
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        self.n_ctx, self.num_classes, self.class_specific = n_ctx, len(classnames), class_specific
        self.ctx = nn.Parameter(init.repeat(len(classnames), 1, 1) if class_specific else init)
        prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
        max_len = clip_model.config.text_config.max_position_embeddings
        tok = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        x_id = tokenizer("X", add_special_tokens=False)["input_ids"]
        if len(x_id) != 1 or not bool((tok["input_ids"][:, 1:1 + n_ctx] == x_id[0]).all()):
            raise ValueError("the tokenizer does not keep the context placeholder 'X' as one token per position")
        self.register_buffer("input_ids", tok["input_ids"], persistent=False)
        self.register_buffer("attention_mask", tok["attention_mask"], persistent=False)

    @property
    def clip(self):
        return self._clip[0]

    def _splice(self, module, inputs, output):
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], ctx.to(output.dtype), output[:, 1 + self.n_ctx:]], dim=1)

    def forward(self) -> torch.Tensor:
        """(C, P) L2-normalised text features of the class prompts."""
        emb = self.clip.text_model.embeddings.token_embedding
        handle = emb.register_forward_hook(self._splice)
        try:
            f = as_features(self.clip.get_text_features(input_ids=self.input_ids, attention_mask=self.attention_mask))
        finally:
            handle.remove()
        return nn.functional.normalize(f.float(), dim=-1)
