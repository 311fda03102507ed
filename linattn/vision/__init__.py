"""Vision: non-causal linear attention on 2-D grids of patch tokens.

    mixers     MIXERS registry: attention (softmax), linear, mala (MALA), lit (LiT)
    reference  the mixers with explicit T x T scores (the float64 oracle of the tests)
    models     VisionConfig, ViT (classifier), DiT (class-conditional, learned variance)
    diffusion  DDPM with learned variance, LiT's hybrid distillation terms
    data       scikit-learn's digits, committed as data/digits.npz, with a fixed split
    quality    a judge classifier: accuracy on generated samples, Frechet distance
    train      `linattn train --task digits --model vit|dit`
    png        image grids as PNG (zlib only)

Only torch and numpy are needed (scikit-learn rewrites the data file; safetensors stores
runs). The registry is separate from linattn.layers.MIXERS, which holds causal mixers.
"""
from .mixers import MIXERS, VisionMixer, make_mixer
from .models import DiT, VisionConfig, ViT

__all__ = ["MIXERS", "VisionMixer", "make_mixer", "VisionConfig", "ViT", "DiT"]
