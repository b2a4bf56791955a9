"""Loading CLIP (transformers; open_clip optional) and batched, cached image features."""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import check_images


def load_clip(name_or_path: str, device: str = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder or a hub name, frozen and in eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, CLIPProcessor.from_pretrained(name_or_path)


def as_features(output) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor on 4.x and an output object on newer 5.x."""
    if torch.is_tensor(output):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot read features from {type(output).__name__}")


def augment(images: np.ndarray, rng: np.random.Generator, min_scale: float = 0.7) -> np.ndarray:
    """Random resized crop (area scale in [min_scale, 1]) + horizontal flip, back to the input size."""
    import torch.nn.functional as F

    n, h, w, _ = images.shape
    out = np.empty_like(images)
    for i in range(n):
        s = np.sqrt(rng.uniform(min_scale, 1.0))
        ch, cw = max(1, int(h * s)), max(1, int(w * s))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = torch.from_numpy(images[i, y:y + ch, x:x + cw]).permute(2, 0, 1)[None].float()
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        crop = crop.round().clamp(0, 255).byte().numpy()
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


class ClipFeatures:
    """L2-normalised CLIP image / text features, batched with progress bars, cached on disk.

    ``cache_dir``: features are stored as ``<cache_dir>/<hash>.npz``, keyed by
    the model id, the images' bytes and the augmentation settings.
    """

    def __init__(self, model, processor, model_id: str = "", batch_size: int = 64,
                 cache_dir: Optional[str] = None, progress: bool = True):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.batch_size, self.cache_dir, self.progress = batch_size, cache_dir, progress

    @property
    def device(self):
        return next(self.model.parameters()).device

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def _encode(self, images: np.ndarray, desc: str) -> np.ndarray:
        out = []
        for i in tqdm(range(0, len(images), self.batch_size), desc=desc, disable=not self.progress, leave=False):
            pixels = self.pixel_values(images[i:i + self.batch_size]).to(self.device)
            f = as_features(self.model.get_image_features(pixel_values=pixels)).float()
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu().numpy())
        return np.concatenate(out)

    def _cache_path(self, images: np.ndarray, views: int, seed: int) -> Optional[str]:
        if not self.cache_dir:
            return None
        h = hashlib.sha1()
        h.update(f"{self.model_id}|{images.shape}|{views}|{seed}".encode())
        h.update(np.ascontiguousarray(images).tobytes())
        return os.path.join(self.cache_dir, h.hexdigest()[:20] + ".npz")

    def image_features(self, images: np.ndarray, augment_views: int = 0, seed: int = 0) -> np.ndarray:
        """(N, P) features; with ``augment_views`` > 0, the mean over the image and that many
        random augmentations, re-normalised."""
        images = check_images(images)
        path = self._cache_path(images, augment_views, seed)
        if path and os.path.isfile(path):
            with np.load(path, allow_pickle=False) as z:
                return z["features"]
        feats = self._encode(images, "image features")
        if augment_views:
            rng = np.random.default_rng(seed)
            for v in range(augment_views):
                feats = feats + self._encode(augment(images, rng), f"augmented view {v + 1}/{augment_views}")
            feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            np.savez(path, features=feats.astype(np.float32))
        return feats.astype(np.float32)

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        tok = self.processor.tokenizer(list(texts), padding=True, return_tensors="pt").to(self.device)
        f = as_features(self.model.get_text_features(**tok)).float()
        return torch.nn.functional.normalize(f, dim=-1)


def load_open_clip(name: str, pretrained: str) -> Tuple[object, object]:  # pragma: no cover - optional
    """open_clip's (model, preprocess) where that package is installed."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("open_clip is not installed: pip install open_clip_torch, or use load_clip()") from e
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model.eval(), preprocess
