"""The method presets, one registry read by the factory (``build_trainer(method=...)``) and the CLI.

Import-free (no torch, no OpenPrompt), so ``--help`` lists the methods without loading a framework.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class MethodPreset:
    """What a method name sets.

    demonstrations: "none", "text" (LM-BFF's demonstrations as text) or "neural" (RetroPrompt's d_c).
    loss: "ce" (cross-entropy) or "knn" (the kNN-guided loss).
    knn_inference: on, P = lambda p_kNN + (1 - lambda) p_PLM with lambda, k and T tuned on dev; off, lambda = 0
    and nothing is tuned: the prediction is the PLM's distribution.
    """
    demonstrations: str
    loss: str
    knn_inference: bool
    help: str


METHODS: Dict[str, MethodPreset] = {
    "prompt": MethodPreset("none", "ce", False, "plain prompt-based fine-tuning"),
    "demo-text": MethodPreset("text", "ce", False, "LM-BFF: the most similar labeled example of each class as text"),
    "retro": MethodPreset("neural", "knn", True,
                          "full RetroPrompt: neural demonstrations + kNN-guided loss + kNN inference"),
    "retro-no-demo": MethodPreset("none", "knn", True, "RetroPrompt without neural demonstrations"),
    "retro-no-knn-train": MethodPreset("neural", "ce", True, "RetroPrompt with plain cross-entropy"),
    "retro-no-knn-infer": MethodPreset("neural", "knn", False, "RetroPrompt without kNN inference (lambda = 0)"),
}


def method_preset(method: str) -> MethodPreset:
    """The preset of ``method``; an unknown name is a ValueError listing the known ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    return METHODS[method]


__all__ = ["MethodPreset", "METHODS", "method_preset"]
