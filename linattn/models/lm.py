"""CausalLM: embedding, a stack of (mixer, SwiGLU) pre-norm blocks, final norm, LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MIXERS, RMSNorm
from ..ops.fused import swiglu
from ..ops.linear_ce import linear_cross_entropy
from .config import LMConfig


class SwiGLU(nn.Module):
    """x [..., d] -> W_down (silu(x W_gate) * x W_up) [..., d], hidden width `hidden`; the
    activation is linattn.ops.fused.swiglu (one Triton kernel each way on CUDA tensors)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x)))  # [..., 2 hidden] -> [..., hidden]


def make_norm(config: LMConfig) -> nn.Module:
    """The norm config.norm names, over d_model."""
    if config.norm == "layer":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, config.norm_eps)


class Block(nn.Module):
    """x + mixer(norm(x)), then x + swiglu(norm(x)); with mlp_ratio 0 no MLP, or, with
    identity_mlp, x + norm(x) in its place. forward follows the mixers' convention:
    (x [B, T, d], state, cu_seqlens, return_state) -> (x, new_state or None)."""

    def __init__(self, config: LMConfig, name: str, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.mixer_name = name
        self.mixer_norm = make_norm(config)
        self.mixer = MIXERS[name](d, config.n_heads, backend=config.backend, layer_idx=layer_idx,
                                  n_layers=config.n_layers, save_for_backward=config.save_for_backward,
                                  **config.mixer_kwargs(name))
        self.mlp_norm = make_norm(config) if (config.mlp_ratio or config.identity_mlp) else None
        self.mlp = SwiGLU(d, config.mlp_width()) if config.mlp_ratio else None

    def forward(self, x, state=None, cu_seqlens=None, return_state=False):
        y, new_state = self.mixer(self.mixer_norm(x), state=state, cu_seqlens=cu_seqlens,
                                  return_state=return_state)
        return self.feed_forward(x + y), new_state

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's second half on the residual x: x + mlp(norm(x)), x + norm(x) with
        identity_mlp, x itself without either."""
        if self.mlp_norm is None:
            return x
        h = self.mlp_norm(x)
        return x + (h if self.mlp is None else self.mlp(h))


class CausalLM(nn.Module):
    """A causal language model whose layers follow config.layer_pattern().

    forward(input_ids [B, T] int64, cu_seqlens=None) -> logits [B, T, vocab_size], float32
        (float64 for a float64 model). cu_seqlens (int32/int64 [N+1], B == 1) packs N
        independent sequences along T.
    answer_logits(input_ids, positions) -> [N, vocab_size]: forward's logits at N positions
        (flat indices [N] into B * T, or a bool mask [B, T]), the head computed there only (a
        trainer scoring a few positions).
    forward_with_state(input_ids, state=None) -> (logits, state): the same, continuing from
        and returning the per-layer mixer states (a list, one entry per layer; None starts a
        new sequence), so prompts and generated tokens can be fed a chunk at a time.
    loss(input_ids, targets, mask=None, cu_seqlens=None, reduction="mean", ignore_index=-100)
        -> 0-d float32 (float64 for a float64 model): the cross-entropy of the logits forward
        would return against targets [B, T] (int64; mask [B, T] bool, True: counted), computed
        chunk by chunk (linattn.ops.linear_ce) so the [B, T, vocab] logits never exist in full.
    generate(input_ids, max_new_tokens, temperature=0.0) -> [B, T + max_new_tokens] int64.
    num_parameters(exclude_embeddings=False) -> int (a tied head counts once).
    set_sequence_parallel(sp): run every layer sequence-parallel over a
        linattn.parallel.SequenceParallelContext (None: off, the default). forward then takes
        this rank's contiguous slice of the ids, sp.split(input_ids) [B, T_r], and returns the
        logits of that slice [B, T_r, vocab_size]; every rank of sp's group must call it
        together. Parameter gradients then hold this rank's tokens' part: all-reduce them (SUM)
        over the group. forward_with_state, generate and cu_seqlens need it off.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = (nn.Embedding(config.max_seq_len, config.d_model)
                          if config.pos_embed == "learned" else None)
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        self.blocks = nn.ModuleList(Block(config, name, i)
                                    for i, name in enumerate(config.layer_pattern()))
        self.norm = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        for emb in (self.embed, self.pos_embed, self.lm_head):
            if emb is not None:
                nn.init.normal_(emb.weight, std=config.init_std)
        if config.init == "gpt2":
            self._init_gpt2()
        self.sequence_parallel = None

    def _init_gpt2(self) -> None:
        """config.init "gpt2" (see LMConfig): Zoology's _init_weights on this model."""
        std = self.config.init_std
        for block in self.blocks:
            kept = {f"mixer.{name}" for name in getattr(block.mixer, "init_kept", ())}
            for name, m in block.named_modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None and f"{name}.bias" not in kept:
                    nn.init.zeros_(m.bias)
            if block.mixer_name == "attention":
                nn.init.normal_(block.mixer.o_proj.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def set_sequence_parallel(self, sp) -> None:
        """Sets sp (a SequenceParallelContext, or None) on every mixer; on any layer that
        cannot run sequence-parallel (mLSTMexp) it raises ValueError and changes nothing."""
        for block in self.blocks:
            block.mixer.check_sequence_parallel(sp)
        for block in self.blocks:
            block.mixer.set_sequence_parallel(sp)
        self.sequence_parallel = sp

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an int64 (or int32) tensor [B, T], got "
                            + (str(input_ids.dtype) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"input length {input_ids.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")

    def _head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight  # [vocab, d]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.norm(h), self._head_weight())            # [B, T, vocab]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def embed_ids(self, input_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """input_ids [B, T] -> the first block's input [B, T, d]: token embeddings, plus
        learned positions (from 0, restarting at each sequence of cu_seqlens), dropout."""
        h = self.embed(input_ids)  # [B, T, d]
        if self.pos_embed is not None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            if cu_seqlens is not None:
                cu = cu_seqlens.to(device=pos.device, dtype=torch.long)
                pos = pos - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
            h = h + self.pos_embed(pos)
        return self.embed_dropout(h)

    def _hidden(self, input_ids: torch.Tensor, cu_seqlens) -> torch.Tensor:
        """The last block's output [B, T, d] (before the final norm)."""
        self._check_ids(input_ids)
        h = self.embed_ids(input_ids, cu_seqlens)  # [B, T, d]
        for block in self.blocks:
            h, _ = block(h, cu_seqlens=cu_seqlens)
        return h

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return self._logits(self._hidden(input_ids, cu_seqlens))

    def answer_logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The logits forward(input_ids) has at `positions`, [N, vocab_size]; the head runs
        there only. positions: flat indices [N] (int64, b * T + t; Batch.answer_index), rows
        taken in their order with N known on the host, or a mask [B, T] (bool), its True
        positions in row-major order (counting them reads the mask on the host)."""
        h = self._hidden(input_ids, None)  # [B, T, d]
        if positions.dtype == torch.bool:
            return self._logits(h[positions])
        if positions.dim() != 1 or positions.dtype not in (torch.int64, torch.int32):
            raise TypeError("positions must be flat indices [N] (int64) or a bool mask [B, T], got "
                            f"{positions.dtype} of shape {tuple(positions.shape)}")
        return self._logits(h.flatten(0, 1).index_select(0, positions))  # [N, d] -> [N, V]

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, reduction: str = "mean",
             ignore_index: int = -100) -> torch.Tensor:
        h = self.norm(self._hidden(input_ids, cu_seqlens))
        return linear_cross_entropy(h, self._head_weight(), targets, mask,
                                    ignore_index=ignore_index, reduction=reduction)

    def forward_with_state(self, input_ids: torch.Tensor, state: list | None = None):
        self._check_ids(input_ids)
        if self.sequence_parallel is not None:
            raise ValueError("forward_with_state and generate run on one process: "
                             "call set_sequence_parallel(None) first")
        if state is None:
            state = [None] * len(self.blocks)
        elif self.pos_embed is not None:
            raise ValueError("a model with learned positions (pos_embed 'learned') keeps no position "
                             "in its state: forward_with_state starts sequences only (state=None)")
        if len(state) != len(self.blocks):
            raise ValueError(f"state must hold one entry per layer ({len(self.blocks)}), got {len(state)}")
        h = self.embed_ids(input_ids)
        new_state = []
        for block, s in zip(self.blocks, state):
            h, s = block(h, state=s, return_state=True)
            new_state.append(s)
        return self._logits(h), new_state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation, one token per step through the
        mixers' states (with learned positions, through the whole sequence each step). input_ids [B, T] with T >= 1; returns [B, T + max_new_tokens]."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError("max_new_tokens and temperature must be >= 0")
        out = [input_ids]
        logits, state = self.forward_with_state(input_ids)
        for _ in range(max_new_tokens):
            last = logits[:, -1]                                             # [B, vocab]
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt)
            if self.pos_embed is None:
                logits, state = self.forward_with_state(nxt, state)
            else:  # learned positions keep no state to continue: the whole sequence again
                logits, state = self.forward_with_state(torch.cat(out, dim=1))
        return torch.cat(out, dim=1)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
