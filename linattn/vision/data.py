"""scikit-learn's handwritten digits (8x8 grey images, 10 classes), shipped as a small .npz.

The images are `sklearn.datasets.load_digits()` (1,797 images of 8x8 pixels with values
0..16, the UCI "Optical Recognition of Handwritten Digits" test set; scikit-learn is BSD-3
and the UCI data set CC BY 4.0, both allow redistribution with attribution). They are
committed as linattn/vision/data/digits.npz (images uint8 [1797, 8, 8], labels uint8
[1797]), so training needs no scikit-learn (the GPU machine has none);
`python -m linattn.vision.data` rewrites the file from scikit-learn (the `vision` extra).

The train/test split is fixed: a permutation drawn with numpy's PCG64 seeded SPLIT_SEED,
its first TEST_SIZE indices the test set, the rest the training set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DIGITS_FILE = Path(__file__).parent / "data" / "digits.npz"
SPLIT_SEED, TEST_SIZE = 0, 360
IMAGE_SIZE, NUM_CLASSES, MAX_PIXEL = 8, 10, 16


def digits_from_sklearn() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8], labels uint8 [1797]) from scikit-learn; ValueError naming
    the extra when scikit-learn is not installed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("scikit-learn is not installed: pip install 'linattn[vision]' "
                         f"(training reads the committed {DIGITS_FILE.name} and does not need it)") from None
    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.uint8)


def write_cache(path: Path = DIGITS_FILE) -> Path:
    """Writes the digits from scikit-learn to `path` (.npz with "images" and "labels")."""
    images, labels = digits_from_sklearn()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, labels=labels)
    return path


def load_arrays(path: Path = DIGITS_FILE) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8], labels uint8 [N]) from the cached file, written from
    scikit-learn first when the file is missing."""
    path = Path(path)
    if not path.is_file():
        write_cache(path)
    with np.load(path) as f:
        return f["images"], f["labels"]


def split_indices(n: int) -> dict[str, np.ndarray]:
    """{"train": int64 [n - TEST_SIZE], "test": int64 [TEST_SIZE]}: the fixed split."""
    perm = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(n)
    return {"test": np.sort(perm[:TEST_SIZE]), "train": np.sort(perm[TEST_SIZE:])}


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 8, 8] scaled to [-1, 1], labels int64 [N]) of "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = load_arrays()
    idx = split_indices(len(labels))[split]
    x = torch.from_numpy(images[idx].astype(np.float32)).unsqueeze(1) * (2.0 / MAX_PIXEL) - 1.0
    return x, torch.from_numpy(labels[idx].astype(np.int64))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape) to uint8 grey levels 0..255, clamped."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


if __name__ == "__main__":
    print(f"wrote {write_cache()}")
