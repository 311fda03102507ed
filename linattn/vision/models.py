"""A ViT classifier and a class-conditional DiT (adaLN-Zero blocks, learned variance) built
from the non-causal mixers of linattn.vision.mixers.

VisionConfig holds both; `model_type` picks ViT ("vit") or DiT ("dit"). Images are
[B, channels, S, S]; patches of patch_size x patch_size pixels make an (S/p) x (S/p) grid of
tokens, row-major.

    ViT  patch embedding + a learned absolute position embedding, pre-norm blocks
         (x += CPE(x) when the mixer uses one; x += mixer(LN x); x += MLP(LN x)), final LN,
         mean over tokens, a linear head -> logits [B, num_classes]
    DiT  patch embedding + fixed 2-D sin-cos position embedding (DiT's), conditioning
         c = t_embed(t) + y_embed(y); each block modulates LN outputs with shift/scale and
         gates its residual branches (adaLN-Zero: the modulation starts at zero); the final
         layer outputs per pixel the noise and the variance interpolation v -> [B, 2*ch, S, S]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from .grid import depthwise
from .mixers import MIXERS, make_mixer

MODEL_TYPES = ("vit", "dit")


@dataclass
class VisionConfig:
    model_type: str = "vit"
    mixer: str = "mala"
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 0  # 0: the mixer's default (lit: 2, others: 4)
    mlp_ratio: float = 2.0
    backend: str = "auto"
    image_size: int = 8
    patch_size: int = 1
    channels: int = 1
    num_classes: int = 10
    # dit only
    diffusion_steps: int = 100
    inherit_from: str = ""  # a trained DiT run: weight inheritance + teacher of the distillation
    distill_eps: float = 1.0  # weight of |eps_student - eps_teacher|^2
    distill_var: float = 1.0  # weight of |v_student - v_teacher|^2 (the variance interpolation)
    eval_samples: int = 20  # samples per class of the sample-quality evaluation

    def validate(self) -> "VisionConfig":
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model must be one of {', '.join(MODEL_TYPES)} for vision, got {self.model_type!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown vision mixer {self.mixer!r}; choose one of {', '.join(MIXERS)}")
        for name in ("d_model", "n_layers", "image_size", "patch_size", "channels", "num_classes",
                     "diffusion_steps", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        heads = self.n_heads or MIXERS[self.mixer].default_heads
        if self.n_heads < 0 or self.d_model % heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {heads}")
        if self.mixer == "mala" and (self.d_model // heads) % 4:
            raise ValueError(f"mala's 2-D RoPE needs d_model / n_heads divisible by 4, got {self.d_model // heads}")
        if self.distill_eps < 0 or self.distill_var < 0:
            raise ValueError("distill_eps and distill_var must be >= 0")
        if self.inherit_from and self.model_type != "dit":
            raise ValueError("inherit_from (weight inheritance and distillation) is for --model dit")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // self.patch_size
        return n, n

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "VisionConfig":
        known = {f.name for f in fields(VisionConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown vision model setting {', '.join(unknown)}")
        return VisionConfig(**d).validate()


class PatchEmbed(nn.Module):
    """[B, ch, S, S] -> [B, (S/p)^2, C]: each p x p patch through one linear map."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.p = cfg.patch_size
        self.proj = nn.Linear(cfg.channels * self.p * self.p, cfg.d_model)

    def forward(self, img):
        B, ch, S, _ = img.shape
        p = self.p
        patches = img.reshape(B, ch, S // p, p, S // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(patches.reshape(B, (S // p) ** 2, ch * p * p))


def unpatchify(tokens, cfg: VisionConfig, out_ch: int):
    """[B, T, out_ch * p * p] -> [B, out_ch, S, S]."""
    B = tokens.shape[0]
    p, n = cfg.patch_size, cfg.image_size // cfg.patch_size
    x = tokens.reshape(B, n, n, out_ch, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, out_ch, n * p, n * p)


def _mlp(cfg):
    hidden = int(cfg.mlp_ratio * cfg.d_model)
    return nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.d_model))


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.mixer = make_mixer(cfg.mixer, cfg.d_model, cfg.n_heads, cfg.backend)
        self.cpe = (nn.Conv2d(cfg.d_model, cfg.d_model, 3, padding=1, groups=cfg.d_model)
                    if self.mixer.block_cpe else None)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.mlp = _mlp(cfg)

    def forward(self, x, grid):
        if self.cpe is not None:
            x = x + depthwise(x, self.cpe, grid)
        x = x + self.mixer(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """images [B, ch, S, S] -> logits [B, num_classes] (float32 under autocast too)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg)
        self.pos = nn.Parameter(torch.randn(1, cfg.grid[0] * cfg.grid[1], cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def features(self, img):
        """[B, d_model]: the pooled representation the head reads."""
        x = self.embed(img) + self.pos
        for blk in self.blocks:
            x = blk(x, self.cfg.grid)
        return self.norm(x).mean(dim=1)

    def forward(self, img):
        return self.head(self.features(img)).float()


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """DiT's fixed 2-D sin-cos position embedding [H*W, dim]: half the channels encode the
    row, half the column, each as sin/cos of positions times 10000^(-i / (dim/4))."""
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def enc(pos):  # [n] -> [n, dim/2]
        a = pos[:, None].double() * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    rows = enc(torch.arange(h)).repeat_interleave(w, 0)
    cols = enc(torch.arange(w)).repeat(h, 1)
    return torch.cat([rows, cols], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of integer timesteps t [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.d_model
        self.mixer = make_mixer(cfg.mixer, C, cfg.n_heads, cfg.backend)
        self.cpe = nn.Conv2d(C, C, 3, padding=1, groups=C) if self.mixer.block_cpe else None
        self.norm1 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.mlp = _mlp(cfg)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, c, grid):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        if self.cpe is not None:
            x = x + depthwise(x, self.cpe, grid)
        x = x + g1[:, None] * self.mixer(modulate(self.norm1(x), sh1, sc1), grid)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """(x_t [B, ch, S, S], t [B] int64, y [B] int64) -> [B, 2 * ch, S, S] float32: the
    predicted noise (first ch channels) and the variance interpolation v in [-1, 1] scale
    (last ch channels; see linattn.vision.diffusion)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C = cfg.d_model
        self.embed = PatchEmbed(cfg)
        self.register_buffer("pos", sincos_2d(C, cfg.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        self.y_embed = nn.Embedding(cfg.num_classes, C)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.final = nn.Linear(C, cfg.patch_size ** 2 * 2 * cfg.channels)
        for blk in self.blocks:  # adaLN-Zero: every residual branch starts switched off
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        for lin in (self.final_ada[1], self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, y):
        c = self.t_embed(timestep_embedding(t, self.cfg.d_model)) + self.y_embed(y)
        h = self.embed(x) + self.pos
        for blk in self.blocks:
            h = blk(h, c, self.cfg.grid)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.norm(h), shift, scale))
        return unpatchify(out, self.cfg, 2 * self.cfg.channels).float()


def build_vision_model(cfg: VisionConfig, device, seed: int) -> nn.Module:
    """ViT or DiT of cfg on device, initial weights a function of seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (ViT if cfg.model_type == "vit" else DiT)(cfg)
    return model.to(device)


def inherit_weights(student: nn.Module, teacher_state: dict) -> list[str]:
    """LiT's weight inheritance: copy every tensor of teacher_state into student except the
    mixers' own (names containing ".mixer."); returns the names copied. ValueError when a
    shared name has another shape (a teacher of another size)."""
    own = student.state_dict()
    copied = []
    for name, t in teacher_state.items():
        if ".mixer." in name or name not in own:
            continue
        if own[name].shape != t.shape:
            raise ValueError(f"teacher's {name} is {list(t.shape)}, the student's {list(own[name].shape)}: "
                             "the teacher must have the student's d_model, layers and patch size")
        own[name].copy_(t)
        copied.append(name)
    return copied
