"""Sample quality of generated digits, judged by a classifier trained on the real ones.

The judge is an MLP (64 -> 128 -> 128 -> 10, GELU) trained full-batch on the training split
(deterministic for a seed, a second on a CPU); its 128-d penultimate activations are the
feature space of the Frechet distance, as Inception's are for FID.

    frechet_distance(a, b)  |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)
    class_accuracy          the judge's accuracy on generated samples, per intended class
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import NUM_CLASSES, digits_split


class Judge(nn.Module):
    def __init__(self, pixels: int = 64, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def features(self, img):
        """img [B, 1, 8, 8] in [-1, 1] -> [B, hidden] float32."""
        return self.body(img.float())

    def forward(self, img):
        return self.head(self.features(img))


@functools.lru_cache(maxsize=4)
def train_judge(seed: int = 0, steps: int = 300, device="cpu") -> Judge:
    """The judge trained on the digits' training split (full batch, AdamW), in eval mode;
    one per (seed, steps, device) per process (callers must not train it further)."""
    x, y = (t.to(device) for t in digits_split("train"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge().to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(judge(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return judge.eval()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, F] and b [M, F]
    (N, M >= 2), computed in float64 with symmetric eigendecompositions."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"feature sets must be [N, F] and [M, F] with N, M >= 2, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _psd_sqrt(cov_a)
    cross = _psd_sqrt(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues of
    rounding clamped to 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


@torch.no_grad()
def sample_quality(judge: Judge, samples: torch.Tensor, labels: torch.Tensor,
                   reference: torch.Tensor) -> dict:
    """samples [N, 1, 8, 8] generated for labels [N]; reference: real images [M, 1, 8, 8].
    Returns {"sample_accuracy", "per_class_accuracy" (list of NUM_CLASSES, None for a class
    without samples), "fd" (samples vs reference in the judge's features)}."""
    judge = judge.to(samples.device)
    pred = judge(samples).argmax(-1)
    right = (pred == labels).float()
    per_class = [float(right[labels == c].mean()) if (labels == c).any() else None for c in range(NUM_CLASSES)]
    fd = frechet_distance(judge.features(samples), judge.features(reference.to(samples.device)))
    return {"sample_accuracy": float(right.mean()), "per_class_accuracy": per_class, "fd": fd}
