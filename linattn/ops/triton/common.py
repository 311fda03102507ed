"""Small shared Triton helpers: the interpreter switch, the gate kinds, a float32/ieee-aware
dot, the packed chunk/tile layout of (possibly variable-length) sequences, and a chunk-local
cumulative sum.

Every kernel family works on tokens packed along one axis: q, k, v as [TT, H, D] (TT = B*T,
or the packed T of cu_seqlens), each sequence n covering tokens [cu[n], cu[n+1]). A sequence
is cut into chunks of L tokens (a state is written at every chunk boundary) and each chunk
into tiles of BT tokens (what one program holds). `ChunkLayout` holds the index arrays the
kernels read to find their sequence, chunk and state slot.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

# True when kernels run on the CPU through Triton's interpreter (set before triton's import):
# there autotuning cannot time configs and bf16 arithmetic is wrong, so launchers pick one
# config by heuristic and kernels upcast loads to float32 before any math.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Gate kinds: the one numbering of the log-decay g that every kernel family's GATE constexpr
# takes (gated_fwd/gated_bwd, delta_fwd/delta_bwd, recurrent). Kernels compare GATE with the
# tl.constexpr globals (the only globals Triton reads inside @triton.jit); launchers, configs
# and custom ops hold plain ints, GATE_KINDS[name] or GATE_X.value. The gated and delta
# families take a constant [H] decay broadcast to [TT, H], as GATE_SCALAR.
GATE_KINDS = {"none": 0, "const": 1, "scalar": 2, "key": 3}
GATE_NONE = tl.constexpr(GATE_KINDS["none"])      # no decay
GATE_CONST = tl.constexpr(GATE_KINDS["const"])    # one log-decay per head, g [H]
GATE_SCALAR = tl.constexpr(GATE_KINDS["scalar"])  # one per token and head, g [.., H]
GATE_KEY = tl.constexpr(GATE_KINDS["key"])        # one per token, head and key, g [.., H, K]


def gate_of(g, const_as_scalar: bool = True) -> int:
    """GATE of a log-decay g as the ops take it: None, [H] (GATE_CONST; GATE_SCALAR where
    const_as_scalar: the chunk kernels read it broadcast), [.., H] with one or two leading
    token axes (GATE_SCALAR) or [B, T, H, K] (GATE_KEY)."""
    if g is None:
        return GATE_NONE.value
    if g.dim() == 1:
        return (GATE_SCALAR if const_as_scalar else GATE_CONST).value
    return (GATE_KEY if g.dim() == 4 else GATE_SCALAR).value


def gate_kind_of(g) -> str:
    """The GATE_KINDS name of a log-decay g: "none", "const" [H], "scalar" [.., H], "key"
    [B, T, H, K] (the step kernel's gate_kind)."""
    code = gate_of(g, const_as_scalar=False)
    return next(name for name, value in GATE_KINDS.items() if value == code)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def head_tile(d: int, cap: int) -> int:
    """Tile width for a head dim d: a power of two in [16, cap], masked where it overhangs."""
    return max(16, min(cap, next_pow2(d)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 for the CPU (and the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def fill_v_block(BV: int, V: int, programs_per_v_block: int, sms: int,
                 min_bv: int = 16) -> int:
    """V block of a sequential state scan (one program per sequence, head and state block):
    BV halved, down to min_bv (16: tl.dot's smallest), while the programs,
    programs_per_v_block * cdiv(V, BV), are fewer than sms, the device's SM count (the
    launchers pass sm_count(device): 0 on the CPU, which never cuts). Few long sequences
    (B = 2 at T = 32768: 32 (sequence, head) pairs at H = 16) otherwise leave most SMs idle
    through the scans' chunk-by-chunk loop; at the bench's B = 8 every scan already has >= 256
    programs, so nothing changes there."""
    while BV > max(min_bv, 16) and programs_per_v_block * triton.cdiv(V, BV) < sms:
        BV //= 2
    return BV


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32: exact ieee products with IEEE (float32 inputs), else
    tl.dot's default (bf16/fp16 operands as given, tf32 products for float32 operands)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def split16(x, DT: tl.constexpr):
    """float32 x -> (hi, lo) in the 16-bit dtype DT with hi + lo = x to ~16 significant bits:
    a dot against a 16-bit operand B as dot(hi, B) + dot(lo, B) keeps x's precision finer than
    one tf32 dot, with B entering as it is stored (no float32 copy staged for a tf32 dot)."""
    hi = x.to(DT)
    return hi, (x - hi.to(tl.float32)).to(DT)


@triton.jit
def dot_parts(a1, b1, a2, b2, acc, PARTS: tl.constexpr):
    """a1 @ b1 + acc, plus a2 @ b2 when PARTS == 2: the dots of dot_a16 and dot_b16."""
    tl.static_assert(PARTS == 1 or PARTS == 2, "PARTS: 1 or 2 16-bit parts of x")
    acc = tl.dot(a1, b1, acc)
    if PARTS == 2:
        acc = tl.dot(a2, b2, acc)
    return acc


@triton.jit
def dot_a16(a, x, acc, PARTS: tl.constexpr):
    """a @ x + acc (acc None: zeros) for a 16-bit a and a float32 x that enters as PARTS
    16-bit parts: 2, its split16 halves (~16 significant bits); 1, x rounded to a's dtype (one
    16-bit dot, as fla's scans take the state)."""
    hi, lo = split16(x, a.dtype)
    return dot_parts(a, hi, a, lo, acc, PARTS)


@triton.jit
def dot_b16(x, b, acc, PARTS: tl.constexpr):
    """x @ b + acc for a float32 x in PARTS 16-bit parts and a 16-bit b (see dot_a16)."""
    hi, lo = split16(x, b.dtype)
    return dot_parts(hi, b, lo, b, acc, PARTS)


if INTERPRET:
    @triton.jit
    def exp(x, PRECISE: tl.constexpr):
        """e^x in float32 (the interpreter's numpy exp is correctly rounded either way)."""
        return tl.exp(x.to(tl.float32))
else:
    from triton.language.extra import libdevice

    @triton.jit
    def exp(x, PRECISE: tl.constexpr):
        """e^x in float32 (x may be float64); PRECISE uses libdevice's expf (about 1 ulp):
        tl.exp on float32 compiles to ex2.approx of the rounded x * log2(e)."""
        if PRECISE:
            return libdevice.exp(x.to(tl.float32))
        else:
            return tl.exp(x.to(tl.float32))


# ----------------------------------------------------------------------------- loaders

# Every kernel family addresses memory one way: a base pointer with int64 offsets (at a head,
# x + h * D; at a sequence's first token and head, x + (bos * H + h) * D; at a state,
# x + slot * K * V), int64 rows times a row stride (H * D for a packed [TT, H, D] tensor) plus
# columns, and a mask on every load and store. Masked loads read 0, which the dots and sums
# rely on past a sequence's end and a head dim's.

@triton.jit
def ld_raw(base, rows, rmask, cols, cmask, RS):
    """[len(rows), len(cols)] tile in its stored dtype of a row-major tensor of row stride RS
    (base points at column 0 of row 0: head h of a [TT, H, D] tensor with RS = H * D). Gate
    exponents load this way in their stored dtype (float64 for float32 inputs: see
    gated_api.gate_dtype)."""
    ptr = base + rows[:, None] * RS + cols[None, :]
    return tl.load(ptr, mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def ld_tile(base, rows, rmask, cols, cmask, RS):
    """The tile of ld_raw in float32."""
    return ld_raw(base, rows, rmask, cols, cmask, RS).to(tl.float32)


@triton.jit
def st_tile(base, x, rows, rmask, cols, cmask, RS):
    """Stores x [len(rows), len(cols)] into the tile ld_raw reads, in the tensor's dtype."""
    ptr = base + rows[:, None] * RS + cols[None, :]
    tl.store(ptr, x.to(base.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def ld_tok(base, rows, rmask, H):
    """float32 [len(rows)] per-token values of a [TT, H] tensor; base points at head h."""
    return tl.load(base + rows * H, mask=rmask, other=0.0).to(tl.float32)


@triton.jit
def ld_gtok(base, rows, rmask, H):
    """[len(rows)] per-token gate exponents in their stored dtype; base points at head h."""
    return tl.load(base + rows * H, mask=rmask, other=0.0)


@triton.jit
def ld_state(base, cols_k, mk, cols_v, mv, V):
    """[BK, BV] block of one [K, V] state in its stored dtype; base points at the state."""
    return ld_raw(base, cols_k, mk, cols_v, mv, V)


@dataclass
class ChunkLayout:
    """Index arrays (on the inputs' device) of N packed sequences cut into chunks and tiles.

    State slots: sequence n owns nc_n + 1 consecutive slots starting at chunk_off[n] + n,
    slot c holding the state before its chunk c (slot nc_n: the final state).
    """
    cu: torch.Tensor            # int32 [N+1]  token offsets of the sequences
    chunk_off: torch.Tensor     # int32 [N+1]  cumulative chunk counts
    tile_seq: torch.Tensor      # int32 [NT]   sequence of each tile
    tile_start: torch.Tensor    # int32 [NT]   first token of each tile
    tile_idx: torch.Tensor      # int32 [NT]   index of each tile inside its sequence
    chunk_start: torch.Tensor   # int32 [NC]   first token of each chunk
    chunk_end: torch.Tensor     # int32 [NC]   one past the last token of each chunk
    chunk_last: torch.Tensor    # int64 [NC]   last token of each chunk
    chunk_end_slot: torch.Tensor  # int64 [NC] slot of the state after each chunk
    final_slot: torch.Tensor    # int64 [N]    slot of each sequence's final state
    first_tok: torch.Tensor     # int64 [N]    first token of each sequence (clamped to TT-1)
    seq_len: torch.Tensor       # int64 [N]    length of each sequence
    nonempty: torch.Tensor      # int64 [N']   indices of the sequences with at least one token
    N: int
    NC: int
    NT: int
    TT: int
    L: int
    BT: int

    @property
    def n_slots(self) -> int:
        return self.NC + self.N


def make_layout(lengths, L: int, BT: int, device) -> ChunkLayout:
    """Layout of sequences of the given lengths (python ints), chunk L and tile BT (BT | L).

    Cached per (lengths, L, BT, device): a training loop calls every layer with the same
    shapes, and building one costs a host-to-device copy, which waits for the GPU's queue to
    drain (one copy per call at most: the index arrays travel in one buffer). The kernels
    only read a layout, so sharing one between calls is safe."""
    if L % BT:
        raise ValueError(f"chunk length {L} must be a multiple of the tile {BT}")
    return _cached_layout(tuple(int(n) for n in lengths), int(L), int(BT), torch.device(device))


@functools.lru_cache(maxsize=64)
def _cached_layout(lengths: tuple, L: int, BT: int, device: torch.device) -> ChunkLayout:
    lens = np.asarray(lengths, dtype=np.int64)
    N = len(lens)
    cu = np.concatenate([[0], np.cumsum(lens)])
    nc = -(-lens // L)                                   # chunks per sequence
    coff = np.concatenate([[0], np.cumsum(nc)])
    nt = -(-lens // BT)                                  # tiles per sequence
    tile_seq = np.repeat(np.arange(N), nt)
    tile_idx = np.arange(nt.sum()) - np.repeat(np.cumsum(nt) - nt, nt)
    tile_start = cu[:-1][tile_seq] + tile_idx * BT
    ch_seq = np.repeat(np.arange(N), nc)
    ch_idx = np.arange(nc.sum()) - np.repeat(coff[:-1], nc)
    ch_start = cu[:-1][ch_seq] + ch_idx * L
    ch_end = np.minimum(ch_start + L, cu[1:][ch_seq])
    TT = int(cu[-1])
    fields = dict(                                       # name -> (host array, dtype)
        cu=(cu, torch.int32), chunk_off=(coff, torch.int32),
        tile_seq=(tile_seq, torch.int32), tile_start=(tile_start, torch.int32),
        tile_idx=(tile_idx, torch.int32),
        chunk_start=(ch_start, torch.int32), chunk_end=(ch_end, torch.int32),
        chunk_last=(ch_end - 1, torch.int64),
        chunk_end_slot=(coff[:-1][ch_seq] + ch_seq + ch_idx + 1, torch.int64),
        final_slot=(coff[1:] + np.arange(N), torch.int64),
        first_tok=(np.minimum(cu[:-1], max(TT - 1, 0)), torch.int64), seq_len=(lens, torch.int64),
        nonempty=(np.flatnonzero(lens > 0), torch.int64))
    # one int64 buffer, one copy; each field a slice of it (int32 fields converted on device)
    flat = torch.as_tensor(np.concatenate([a.astype(np.int64).ravel() for a, _ in fields.values()]))
    flat = flat.to(device)
    out, pos = {}, 0
    for name, (a, dt) in fields.items():
        out[name] = flat[pos:pos + a.size].to(dt)        # a view for int64, a copy for int32
        pos += a.size
    return ChunkLayout(**out, N=N, NC=int(nc.sum()), NT=int(nt.sum()), TT=TT, L=L, BT=BT)


def lengths_of(cu_seqlens, B: int, T: int):
    """Python list of sequence lengths: B sequences of T, or the packed cu_seqlens (one sync)."""
    if cu_seqlens is None:
        return [T] * B
    c = cu_seqlens.tolist()
    return [b - a for a, b in zip(c[:-1], c[1:])]


# ----------------------------------------------------------------------------- chunk cumsum

@triton.jit
def chunk_cumsum_kernel(x, y, excl, chunk_start, chunk_end, C, L: tl.constexpr, BC: tl.constexpr,
                        REVERSE: tl.constexpr, ADD_EXCL: tl.constexpr):
    """y[t, c] = sum of x[s, c] over s <= t (s >= t when REVERSE) inside t's chunk, in y's
    dtype; ADD_EXCL adds the exclusive forward sum of excl[s, c] over s < t. y may be x."""
    tl.static_assert(L >= 16)
    ic = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    cs = tl.load(chunk_start + ic).to(tl.int64)                 # chunk's first token
    ce = tl.load(chunk_end + ic).to(tl.int64)                   # one past its last token
    rows = cs + tl.arange(0, L)
    cols = cb * BC + tl.arange(0, BC)
    mask = (rows < ce)[:, None] & (cols < C)[None, :]
    ptr = rows[:, None] * C + cols[None, :]
    a = tl.load(x + ptr, mask=mask, other=0.0).to(y.dtype.element_ty)  # [L, BC] chunk slice
    out = tl.cumsum(a, axis=0, reverse=REVERSE)
    if ADD_EXCL:
        # sum over the earlier tokens: an inclusive cumsum of the slice shifted down one row
        # (not cumsum(b) - b, which leaves eps * |b_t| of a large b_t in a small sum)
        prev = mask & (rows > cs)[:, None]
        b = tl.load(excl + ptr - C, mask=prev, other=0.0).to(y.dtype.element_ty)
        out += tl.cumsum(b, axis=0)
    tl.store(y + ptr, out, mask=mask)


def _chunk_scan(x, y, excl, layout: ChunkLayout, reverse: bool):
    C = x[0].numel() if x.shape[0] else 1
    if layout.NC == 0 or C == 0:
        return y
    BC = min(64, next_pow2(C)) if layout.L <= 256 else min(16, next_pow2(C))
    chunk_cumsum_kernel[(layout.NC, triton.cdiv(C, BC))](
        x, y, excl if excl is not None else x, layout.chunk_start, layout.chunk_end, C,
        L=layout.L, BC=BC, REVERSE=reverse, ADD_EXCL=excl is not None)
    return y


def chunk_cumsum(x: torch.Tensor, layout: ChunkLayout, reverse: bool = False,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Chunk-local inclusive (reverse) cumsum along dim 0 of x [TT, ...] -> dtype, same shape."""
    from ..alloc import empty
    x = x.contiguous()
    return _chunk_scan(x, empty(x.shape, dtype=dtype, device=x.device), None, layout, reverse)


def gate_grad_(db: torch.Tensor, sp: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """db <- chunk-local reverse cumsum of db + exclusive forward cumsum of sp, in place
    (db and sp contiguous, the same shape [TT, ...]); returns db."""
    return _chunk_scan(db, db, sp, layout, reverse=True)


# ----------------------------------------------------------------------------- row dot

ROW_DOT_ROWS = 32   # rows per program ([32, 64] float32 tiles: no spills at 4 warps)


@triton.jit
def row_dot_kernel(a, b, out, R, D, BR: tl.constexpr, BD: tl.constexpr):
    """out[r] = sum_d a[r, d] * b[r, d] in float32, for BR rows of [R, D] row-major inputs."""
    tl.static_assert(BR >= 16 and BD >= 16)
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mr = rows < R
    acc = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        m = mr[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(a + off, mask=m, other=0.0).to(tl.float32)      # [BR, BD]
        y = tl.load(b + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=1)                                # products and sums in fp32
    tl.store(out + rows, acc, mask=mr)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum(-1) in float32 without float32 copies of a and b: a, b [..., D] contiguous,
    one shape and any float dtype -> [...] float32."""
    D = a.shape[-1]
    R = a.numel() // D if D else 0
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    if R:
        BD = head_tile(D, 64)
        row_dot_kernel[(triton.cdiv(R, ROW_DOT_ROWS),)](a, b, out, R, D, BR=ROW_DOT_ROWS, BD=BD)
    elif out.numel():
        out.zero_()
    return out
