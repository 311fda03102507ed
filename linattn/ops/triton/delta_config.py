"""The delta rule's launch choices as one value: DeltaConfig, passed to every launcher.

The kernels' launchers (delta_fwd, delta_bwd) read their tiles, warps, stages, the 16-bit
forms of their dots and the dtypes of their stored intermediates from a DeltaConfig argument;
DEFAULT is what the ops run. Each field's measurement is in benchmarks/PERF_NOTES.md ("Delta
rule: launch choices", "Delta rule: 16-bit intermediates", "Compiler faults and precision
guards"). Tests and the sweeps (benchmarks/sweep_delta.py, flag_diff.py) pass another value
(dataclasses.replace(DEFAULT, ...), with_launch) to the launchers or to
delta_api.delta_rule(..., config=...); two calls in one process may use two configs.

The choices that depend on the inputs (float32 against 16-bit dtypes, K = 256 state tiles,
few sequences) are applied by the launchers from these fields, so one value serves every
(dtype, K, V, gate) on one device: config_for gives it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch


def _frozen(table: dict) -> Mapping:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in table.items()})


# num_warps and num_stages per kernel (sweep_delta on the H200)
LAUNCH = _frozen({
    "prep": dict(num_warps=2, num_stages=1),
    "scan": dict(num_warps=4, num_stages=2),
    "scan_k256": dict(num_warps=8, num_stages=1),        # a 256-wide state tile (full_tile(K) 256)
    "scan_k256_split": dict(num_warps=4, num_stages=1),  # the same, split dots (16-bit inputs)
    "output": dict(num_warps=4, num_stages=3),
    "reverse_scan": dict(num_warps=4, num_stages=1),     # 2 stages at K < 128 (launcher)
    "reverse_scan_k256": dict(num_warps=8, num_stages=1),  # a 256-wide state tile
    "grads_qk": dict(num_warps=4, num_stages=2),         # 8 warps for float32 (launcher)
    "grads_wy": dict(num_warps=4, num_stages=1),
    "scores": dict(num_warps=4, num_stages=2),           # reverse_scan_scores_min_bk
})


@dataclass(frozen=True)
class DeltaConfig:
    """Launch choices of the delta rule's kernels (defaults: what the ops run)."""
    # num_warps / num_stages per kernel name (LAUNCH)
    launch: Mapping = field(default_factory=lambda: LAUNCH)
    # stored intermediates in the inputs' dtype for 16-bit inputs (else float32): the chunk
    # states h, U' (vnew), and the backward's dU', dW, dk_part
    states_in_input_dtype: bool = True
    vnew_in_input_dtype: bool = True
    grads_in_input_dtype: bool = True
    # the output kernel's V tile cap for 16-bit / float32 inputs
    output_bv: int = 128
    output_bv_f32: int = 64
    # the scans' V tile caps, and the float32 state tile [BK, BV] at most this many elements
    # (16-bit / float32 inputs)
    scan_bv: int = 64
    reverse_scan_bv: int = 64
    state_tile_elems: int = 16384
    state_tile_elems_f32: int = 8192
    # fill_v_block never cuts the scans' V blocks below this; at K = 256 not below
    # scan_min_bv_k256 (a GPU-only fault on 16-wide blocks)
    fill_min_bv: int = 16
    scan_min_bv_k256: int = 32
    # dots with a float32 operand on 16-bit parts of it, for inputs of split16_dtypes: the
    # forward scan (on state tiles up to scan_split16_max_bk rows), the reverse scan (up to
    # reverse_scan_split16_max_bk rows, on V blocks of at least reverse_scan_split16_min_bv),
    # grads_wy (on K tiles of at least grads_wy_split16_min_bk); the scans take
    # *_dot16_parts parts (1: the operand rounded to the inputs' dtype; 2: two halves).
    # bfloat16 only, whose halves have float32's range; float16's would overflow past 65504
    # where a tf32 dot does not (the CPU tests add float16 to run the split in the interpreter)
    split16_dtypes: tuple = (torch.bfloat16,)
    scan_split16: bool = True
    scan_split16_max_bk: int = 256
    scan_dot16_parts: int = 1
    reverse_scan_split16: bool = True
    reverse_scan_split16_max_bk: int = 256
    reverse_scan_split16_min_bv: int = 64
    reverse_scan_dot16_parts: int = 1
    grads_wy_split16: bool = True
    grads_wy_split16_min_bk: int = 64
    # the reverse scan reads the masked scores from delta_bwd_scores_kernel on state tiles at
    # least this many rows wide (1 << 30: never)
    reverse_scan_scores_min_bk: int = 256
    # grads_qk's V tile, ungated and gated (gated 64 is a GPU-only fault)
    grads_qk_tile_bv: int = 64
    grads_qk_tile_bv_gated: int = 32

    def with_launch(self, kernel: str, **options) -> "DeltaConfig":
        """This config with kernel's launch options (num_warps, num_stages) replaced."""
        if kernel not in self.launch:
            raise ValueError(f"unknown kernel {kernel!r}; choose from {sorted(self.launch)}")
        table = {k: dict(v) for k, v in self.launch.items()}
        table[kernel].update(options)
        return dataclasses.replace(self, launch=_frozen(table))


DEFAULT = DeltaConfig()


def config_for(capability: tuple[int, int] | None = None) -> DeltaConfig:
    """The config for a device of this CUDA compute capability (None: the CPU interpreter).
    One value for every device: each choice was measured on sm_90 (H200) and the
    interpreter runs the same launches; a device that needs others gets its row here."""
    return DEFAULT


def split16_on(option: bool, cfg: DeltaConfig, *tensors: torch.Tensor) -> bool:
    """Whether a kernel's SPLIT16 dots run: the option is on and the 16-bit values entering
    those dots are all of one dtype in cfg.split16_dtypes."""
    dtype = tensors[0].dtype
    return option and dtype in cfg.split16_dtypes and all(t.dtype == dtype for t in tensors)
