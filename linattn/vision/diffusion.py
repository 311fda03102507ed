"""DDPM with a learned variance (Improved DDPM's "learned range", as DiT's learn_sigma).

The model returns [B, 2 * ch, S, S]: the noise eps and a variance interpolation v (in
[-1, 1] at the optimum); the reverse step's log-variance is
frac * log(beta_t) + (1 - frac) * log(beta~_t), frac = (v + 1) / 2, beta~ the posterior's.
Loss (DiT's): MSE(eps) + the variational bound term of that variance, its mean taken from
the detached eps so only v learns from it. Betas: DiT's linear schedule 1e-4..0.02 at 1000
steps, scaled by 1000 / steps for shorter chains (at most 0.999).

LiT's hybrid distillation adds distill_eps |eps - eps_teacher|^2 + distill_var
|v - v_teacher|^2 (means over pixels), the teacher a trained softmax DiT run on the same
x_t, t and labels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import MAX_PIXEL


class GaussianDiffusion:
    """Schedule tensors of `steps` steps (float64 on the CPU; gathered per batch)."""

    def __init__(self, steps: int):
        self.steps = steps
        scale = 1000 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64).clamp(max=0.999)
        acp = torch.cumprod(1 - betas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.betas, self.acp, self.acp_prev = betas, acp, acp_prev
        post_var = betas * (1 - acp_prev) / (1 - acp)
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped at t = 0
        self.post_c0 = betas * acp_prev.sqrt() / (1 - acp)
        self.post_ct = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)

    def _at(self, table, t, x):
        """table[t] as float32 [B, 1, 1, 1] on x's device."""
        return table.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise; all [B, ch, S, S]."""
        return self._at(self.acp.sqrt(), t, x0) * x0 + self._at((1 - self.acp).sqrt(), t, x0) * noise

    def posterior(self, x0, xt, t):
        """(mean, log variance) of q(x_{t-1} | x_t, x0)."""
        mean = self._at(self.post_c0, t, xt) * x0 + self._at(self.post_ct, t, xt) * xt
        return mean, self._at(self.post_log_var, t, xt)

    def p_mean_logvar(self, out, xt, t, clip: bool):
        """The reverse step's (mean, log variance, predicted x0) from model output out
        [B, 2 ch, S, S]."""
        ch = xt.shape[1]
        eps, v = out[:, :ch], out[:, ch:]
        frac = (v + 1) / 2
        logvar = frac * self._at(self.betas.log(), t, xt) + (1 - frac) * self._at(self.post_log_var, t, xt)
        x0 = (xt - self._at((1 - self.acp).sqrt(), t, xt) * eps) / self._at(self.acp.sqrt(), t, xt)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.posterior(x0, xt, t)
        return mean, logvar, x0

    def losses(self, out, x0, xt, t, noise) -> dict:
        """{"mse", "vb"}: scalar float32 losses of model output out for (x0, x_t, t, noise)."""
        ch = x0.shape[1]
        mse = F.mse_loss(out[:, :ch], noise)
        frozen = torch.cat([out[:, :ch].detach(), out[:, ch:]], dim=1)
        mean, logvar, _ = self.p_mean_logvar(frozen, xt, t, clip=False)
        true_mean, true_logvar = self.posterior(x0, xt, t)
        kl = 0.5 * (-1 + logvar - true_logvar + (true_logvar - logvar).exp()
                    + (true_mean - mean) ** 2 * (-logvar).exp())
        nll = -discretized_gaussian_log_likelihood(x0, mean, logvar)
        per = torch.where((t == 0).view(-1, 1, 1, 1), nll, kl).mean(dim=(1, 2, 3)) / math.log(2)
        return {"mse": mse, "vb": per.mean()}

    @torch.no_grad()
    def sample(self, model, y, shape, generator=None, autocast_ctx=None):
        """Images [len(y), ch, S, S] in [-1, 1] drawn by the full reverse chain for labels y."""
        from contextlib import nullcontext

        dev = y.device
        x = torch.randn((len(y), *shape), generator=generator, device=dev)
        for i in reversed(range(self.steps)):
            t = torch.full((len(y),), i, device=dev, dtype=torch.long)
            with autocast_ctx or nullcontext():
                out = model(x, t, y)
            mean, logvar, _ = self.p_mean_logvar(out.float(), x, t, clip=True)
            noise = torch.randn(x.shape, generator=generator, device=dev) if i > 0 else torch.zeros_like(x)
            x = mean + (0.5 * logvar).exp() * noise
        return x.clamp(-1, 1)


def discretized_gaussian_log_likelihood(x, mean, logvar):
    """log P(x) per pixel of a Gaussian (mean, exp(logvar)) integrated over x's bin (the 17
    grey levels of the digits, bin width 2 / MAX_PIXEL in [-1, 1]); the end bins are open."""
    half = 1.0 / MAX_PIXEL
    inv_std = (-0.5 * logvar).exp()
    cdf_plus = _normal_cdf(inv_std * (x - mean + half))
    cdf_minus = _normal_cdf(inv_std * (x - mean - half))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus, log_delta))


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def distillation_terms(out, teacher_out, ch: int) -> dict:
    """{"kd_eps", "kd_var"}: mean squared differences of the student's and the teacher's
    noise (first ch channels) and variance interpolation (the rest)."""
    return {"kd_eps": F.mse_loss(out[:, :ch], teacher_out[:, :ch]),
            "kd_var": F.mse_loss(out[:, ch:], teacher_out[:, ch:])}
