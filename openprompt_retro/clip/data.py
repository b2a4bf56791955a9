"""Image data: array files (npz) and ImageFolder trees, checked, with seeded K-shot sampling."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64 in [0, len(classes))
    classes: List[str]

    def __post_init__(self):
        self.images = check_images(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.classes = [str(c) for c in self.classes]
        check_labels(self.labels, self.classes, len(self.images))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


def check_images(images) -> np.ndarray:
    """Images must be RGB uint8 arrays of shape (N, H, W, 3)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (grayscale? stack it to 3 channels)" if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1) else ""
        hint = hint or (" (channels first? move them last)" if images.ndim == 4 and images.shape[1] == 3 else "")
        raise ValueError(f"images must be RGB arrays of shape (N, H, W, 3), got shape {images.shape}{hint}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0-255), got dtype {images.dtype}")
    return images


def check_labels(labels: np.ndarray, classes: Sequence[str], n: int) -> None:
    if len(labels) != n:
        raise ValueError(f"got {n} images but {len(labels)} labels")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {list(classes)}")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels {sorted(set(labels.tolist()) - set(range(len(classes))))[:5]} do not match the "
                         f"{len(classes)} class names {list(classes)[:5]}...")


def load_image_arrays(path: str) -> ImageSet:
    """An npz with ``images`` (N, H, W, 3) uint8, ``labels`` and ``classes`` (as ../shared/data/images/cifar10)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image array file at {path!r}")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("images", "labels", "classes") if k not in z]
        if missing:
            raise ValueError(f"{path!r} lacks arrays {missing}")
        return ImageSet(z["images"], z["labels"], [str(c) for c in z["classes"]])


def load_image_folder(root: str, size: Optional[Tuple[int, int]] = None) -> ImageSet:
    """``root/<class>/<image>``; classes sorted by name; images converted to RGB (and resized to ``size``)."""
    from PIL import Image

    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root!r}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root!r} has no class sub-folders")
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, name))):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                img = Image.open(os.path.join(root, name, f)).convert("RGB")
                if size is not None:
                    img = img.resize(size)
                images.append(np.asarray(img, dtype=np.uint8))
                labels.append(c)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {root!r} differ in size {sorted(shapes)[:3]}...: pass size=(W, H)")
    return ImageSet(np.stack(images), np.array(labels), classes)


def k_shot_indices(labels: np.ndarray, k: int, seed: int, exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """K indices per class, drawn reproducibly with ``seed`` (sorted by class, then draw order)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    out = []
    for c in np.unique(labels):
        pool = np.nonzero((labels == c) & allowed)[0]
        if len(pool) < k:
            raise ValueError(f"class {int(c)} has {len(pool)} images available, fewer than K={k}")
        out.append(rng.choice(pool, size=k, replace=False))
    return np.concatenate(out)
