"""GGUF quantizers and llama.cpp's per-tensor type recipe, in numpy.

Three parts:

* ``quantize_q4_k`` / ``quantize_q5_k`` / ``quantize_q6_k``: re-implementations of
  ggml's reference quantizers (``quantize_row_q{4,5,6}_K_ref`` with
  ``make_qkx2_quants`` / ``make_qx_quants`` in ``ggml/src/ggml-quants.c``, the path
  llama-quantize takes without an importance matrix). They are vectorized across
  all sub-blocks of a tensor but reproduce the C float32 arithmetic step by step:
  sums are accumulated sequentially in element order (``np.add.reduce`` over the
  leading axis of a C-contiguous ``(n, S)`` array, checked at import time),
  every expression is evaluated in C order with float32 operands, ``nearest_int``
  is emulated bit for bit and fp16 stores round to nearest even. The output bytes
  are laid out exactly as ggml's ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``.
* ``quantize(x, qtype)``: one entry point for every type our exporter writes;
  K-quants go to the functions above, Q8_0 / Q4_0 / Q5_0 / F16 / BF16 / F32 to
  ``gguf.quants.quantize``. Rows are processed in chunks on a small thread pool
  (numpy releases the GIL), which bounds memory and uses both cores.
* ``tensor_qtype`` / ``tensor_types`` / ``FTYPES``: which GGML type
  ``llama-quantize`` gives each tensor of a LLaMA model for a given ftype
  (``src/llama-quant.cpp``: ``tensor_allows_quantization``,
  ``llama_tensor_get_type_impl``, ``tensor_type_fallback``), and the
  ``general.file_type`` id of each ftype.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

__all__ = [
    "FTYPES",
    "FtypeInfo",
    "QK_K",
    "SUPPORTED_TYPES",
    "quantize",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
    "quantized_nbytes",
    "tensor_qtype",
    "tensor_types",
    "use_more_bits",
]

QT = GGMLQuantizationType
QK_K = 256
F32 = np.float32
F16_LE = np.dtype("<f2")

_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer (ties to even)
_GROUP_MAX_EPS = F32(1e-15)

# Target number of float32 input values per work chunk: large enough that numpy's
# per-call overhead is small, small enough that temporaries stay in cache.
_CHUNK_VALUES = 1 << 17


# ----------------------------------------------------------------------------
# float32 helpers that mirror the C arithmetic
# ----------------------------------------------------------------------------


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int``: bits of ``v + 12582912.f`` masked, as int32 (exact emulation)."""
    return ((v + _MAGIC).view(np.int32) & 0x7FFFFF) - 0x400000


_RINT_SAFE = F32(2.0**22)


def _round_clip(v: np.ndarray, lo: int, hi: int, bound: np.ndarray | None = None) -> np.ndarray:
    """``clamp(nearest_int(v), lo, hi)`` as float32, computed in place in ``v``.

    For |v| < 2**22 ``np.rint`` (round half to even) is exactly ``nearest_int``.
    ``bound`` is an upper bound of |v| per column (None: check every value); if it
    is not below 2**22 anywhere (scales that overflowed on subnormal inputs, inf,
    NaN), the bit-exact ``nearest_int`` emulation is used instead.
    """
    safe = bool((bound < _RINT_SAFE).all()) if bound is not None else bool((np.abs(v) < _RINT_SAFE).all())
    if not safe:
        q = _nearest_int(v)
        np.clip(q, lo, hi, out=q)
        v[...] = q
        return v
    np.rint(v, out=v)  # round half to even, as nearest_int in this range
    np.clip(v, F32(lo), F32(hi), out=v)
    return v


def _seq_sum_loop(a: np.ndarray) -> np.ndarray:
    s = a[0] + F32(0.0)
    for k in range(1, a.shape[0]):
        s += a[k]
    return s


def _seq_sum_reduce(a: np.ndarray) -> np.ndarray:
    # Reducing over the leading axis of a C-contiguous array adds rows one after the
    # other (no pairwise summation): the C loop order ``s += a[i]`` for each column.
    return np.add.reduce(a, axis=0)


def _check_reduce_is_sequential() -> bool:
    rng = np.random.default_rng(1234)
    a = (rng.standard_normal((32, 257)) * np.exp(4 * rng.standard_normal((32, 257)))).astype(F32)
    return bool(np.array_equal(_seq_sum_reduce(a), _seq_sum_loop(a)))


# Sequential float32 sum over axis 0. Fall back to an explicit loop if a future
# numpy ever reorders the reduction.
_seq_sum: Callable[[np.ndarray], np.ndarray] = (
    _seq_sum_reduce if _check_reduce_is_sequential() else _seq_sum_loop
)


# ----------------------------------------------------------------------------
# make_qkx2_quants (Q4_K, Q5_K) and make_qx_quants (Q6_K), vectorized
# ----------------------------------------------------------------------------


@dataclass
class _Qkx2Result:
    scale: np.ndarray  # (S,) returned scale
    the_min: np.ndarray  # (S,) *the_min (= -min, >= 0 in practice)
    # What is needed to rebuild L for the rare sub-blocks whose stored scale is 0:
    flat: np.ndarray  # (S,) bool, max == min: L = 0
    best_iscale: np.ndarray  # (S,) iscale of the winning candidate
    best_min: np.ndarray  # (S,) value of `min` when the winning candidate was rounded


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> _Qkx2Result:
    """``make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false)``.

    ``x`` and ``w`` are ``(n, S)`` float32: element index first, one column per sub-block.
    """
    fnmax = F32(nmax)
    xmin = x.min(axis=0)
    mn = xmin
    mx = x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    mn = np.minimum(mn, F32(0.0))  # if (min > 0) min = 0
    flat = mx == mn

    # Columns with max == min return early in C; give them a harmless range here
    # and mask every decision with ~flat.
    rng0 = np.where(flat, F32(1.0), mx - mn)
    iscale = fnmax / rng0
    scale = F32(1.0) / iscale
    l = _round_clip(iscale * (x - mn), 0, nmax, np.abs(iscale) * (mx - mn))
    diff = scale * l + mn - x
    diff *= diff
    best_error = _seq_sum(w * diff)

    cur_min = mn  # C's `min`, updated whenever a candidate wins
    best_iscale = iscale
    best_min = mn
    live = ~flat

    for step in range(nstep + 1):
        factor = F32(F32(F32(rmin) + F32(F32(rdelta) * F32(step))) + fnmax)
        rng = mx - cur_min
        rng[flat] = F32(1.0)
        isc = factor / rng
        xm = x - cur_min
        xm *= isc
        # |x - min| <= max(max - min, min - min(x)) bounds |isc * (x - min)|
        l = _round_clip(xm, 0, nmax, np.abs(isc) * np.maximum(mx - cur_min, cur_min - xmin))
        wl = w * l
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * l)
        wl *= x
        sum_xl = _seq_sum(wl)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                this_min = np.where(pos, F32(0.0), this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        diff = l
        diff *= this_scale
        diff += this_min
        diff -= x
        diff *= diff
        diff *= w
        cur_error = _seq_sum(diff)
        acc = (D > 0) & (cur_error < best_error) & live
        if acc.any():
            best_error = np.where(acc, cur_error, best_error)
            scale = np.where(acc, this_scale, scale)
            best_iscale = np.where(acc, isc, best_iscale)
            best_min = np.where(acc, cur_min, best_min)
            cur_min = np.where(acc, this_min, cur_min)

    scale = np.where(flat, F32(0.0), scale)
    the_min = -cur_min
    return _Qkx2Result(scale, the_min, flat, best_iscale, best_min)


def _qkx2_levels(x: np.ndarray, r: _Qkx2Result, nmax: int) -> np.ndarray:
    """The L that make_qkx2_quants left for the given columns (used where d == 0)."""
    l = _round_clip(r.best_iscale * (x - r.best_min), 0, nmax, None)
    l[:, r.flat] = 0
    return l


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` on ``(n, S)`` float32.

    Returns (scale, zero, best_iscale); L for a column is
    ``clamp(nearest_int(best_iscale*x), -nmax, nmax-1) + nmax``, or 0 where ``zero``.
    """
    n, S = x.shape
    cols = np.arange(S)
    ax = np.abs(x)
    imax = ax.argmax(axis=0)  # first index of the largest |x|, as the strict `>` in C
    mx = x[imax, cols]
    zero = ax[imax, cols] < _GROUP_MAX_EPS
    mx = np.where(zero, F32(1.0), mx)
    fnmax = F32(nmax)

    w = x * x
    wx = w * x

    amax = np.abs(mx)

    def sums(isc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        l = _round_clip(isc * x, -nmax, nmax - 1, np.abs(isc) * amax)
        sumlx = _seq_sum(wx * l)
        wl = w * l
        wl *= l
        return sumlx, _seq_sum(wl)

    iscale = -fnmax / mx
    sumlx, suml2 = sums(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
    best = scale * sumlx
    best_iscale = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = F32(fnmax + F32(F32(0.1) * F32(step)))
        isc = -factor / mx
        sumlx, suml2 = sums(isc)
        acc = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if acc.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                new_scale = sumlx / suml2
            scale = np.where(acc, new_scale, scale)
            best = np.where(acc, scale * sumlx, best)
            best_iscale = np.where(acc, isc, best_iscale)
    scale = np.where(zero, F32(0.0), scale)
    return scale, zero, best_iscale


# ----------------------------------------------------------------------------
# Block quantizers
# ----------------------------------------------------------------------------


def _as_blocks(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (rows, cols) array, got shape {x.shape}")
    if x.shape[1] % QK_K != 0:
        raise ValueError(
            f"{what}: row length {x.shape[1]} is not a multiple of {QK_K}; "
            "K-quants need ne[0] % 256 == 0 (llama.cpp falls back to Q5_0/Q5_1/Q8_0 or F16, see tensor_qtype)"
        )
    return np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scale/min packing of block_q4_K / block_q5_K (nb, 8) -> (nb, 12)."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _quantize_k_scale_min(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared part of quantize_row_q4_K_ref / quantize_row_q5_K_ref.

    Returns (d16, dmin16, packed scales (nb, 12), L (nb, 256) uint8).
    """
    nb = blocks.shape[0]
    xt = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)  # (32, S), S = nb*8 sub-blocks
    sum_x2 = _seq_sum(xt * xt)
    av_x = np.sqrt(sum_x2 / F32(32.0))
    w = np.abs(xt)
    w += av_x  # av_x + fabsf(x)
    r = _make_qkx2(xt, w, nmax, rmin, 0.1, nstep)

    scales = r.scale.reshape(nb, 8)
    mins = r.the_min.reshape(nb, 8)
    # `if (scale > max_scale) max_scale = scale` from 0: NaN never wins, hence fmax
    max_scale = np.fmax.reduce(scales, axis=1, initial=F32(0.0))
    max_min = np.fmax.reduce(mins, axis=1, initial=F32(0.0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0))
        inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0))
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d16 = (max_scale / F32(63.0)).astype(F16_LE)
    dmin16 = (max_min / F32(63.0)).astype(F16_LE)

    d = d16.astype(F32)[:, None] * ls.astype(F32)  # (nb, 8)
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    d_s = d.reshape(-1)
    dm_s = dm.reshape(-1)
    skip = d_s == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int((xt + dm_s) / np.where(skip, F32(1.0), d_s))
    np.clip(q, 0, nmax, out=q)
    L = q.astype(np.uint8)
    if skip.any():
        idx = np.nonzero(skip)[0]
        sub = _Qkx2Result(
            r.scale[idx], r.the_min[idx], r.flat[idx], r.best_iscale[idx], r.best_min[idx]
        )
        L[:, idx] = _qkx2_levels(xt[:, idx], sub, nmax).astype(np.uint8)
    L = np.ascontiguousarray(L.T).reshape(nb, QK_K)
    return d16, dmin16, _pack_scales_k4(ls, lm), L


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d16, dmin16, sc, L = _quantize_k_scale_min(blocks, 15, -1.0, 20)
    out = np.empty((nb, 144), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = sc
    L4 = L.reshape(nb, 4, 2, 32)
    out[:, 16:144] = (L4[:, :, 0, :] | (L4[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d16, dmin16, sc, L = _quantize_k_scale_min(blocks, 31, -0.5, 15)
    out = np.empty((nb, 176), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = sc
    L4 = L.reshape(nb, 4, 2, 32)  # 64-chunks c, halves h, j
    hi = (L4 >> 4).astype(np.uint8)  # bit 4 of each level
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for c in range(4):
        qh |= hi[:, c, 0, :] << (2 * c)
        qh |= hi[:, c, 1, :] << (2 * c + 1)
    out[:, 16:48] = qh
    lo = L4 & 0xF
    out[:, 48:176] = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    xt = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # (16, S), S = nb*16
    scale, zero, best_iscale = _make_qx(xt, 32)
    scales = scale.reshape(nb, 16)

    ascales = np.abs(scales)
    # C keeps the first scale with fabsf(scale) > running max, starting from 0: NaN never wins
    ascales = np.where(np.isnan(ascales), F32(0.0), ascales)
    imax = ascales.argmax(axis=1)
    rows = np.arange(nb)
    max_scale = scales[rows, imax]
    zero_block = ascales[rows, imax] < _GROUP_MAX_EPS
    max_scale = np.where(zero_block, F32(1.0), max_scale)
    iscale = F32(-128.0) / max_scale
    d16 = (F32(1.0) / iscale).astype(F16_LE)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
    sc = (sc & 0xFF).astype(np.uint8).view(np.int8)  # int8_t store

    d_s = (d16.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
    skip = d_s == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int(xt / np.where(skip, F32(1.0), d_s))
    np.clip(q, -32, 31, out=q)
    q += 32
    L = q.astype(np.uint8)
    if skip.any():
        idx = np.nonzero(skip)[0]
        lq = _round_clip(best_iscale[idx] * xt[:, idx], -32, 31, None) + F32(32.0)
        lq[:, zero[idx]] = 0
        L[:, idx] = lq.astype(np.uint8)
    L = np.ascontiguousarray(L.T).reshape(nb, 2, 4, 32)

    out = np.empty((nb, 210), dtype=np.uint8)
    a, b, c, e = L[:, :, 0, :], L[:, :, 1, :], L[:, :, 2, :], L[:, :, 3, :]
    ql = np.empty((nb, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (a & 0xF) | ((c & 0xF) << 4)
    ql[:, :, 32:64] = (b & 0xF) | ((e & 0xF) << 4)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = ((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)).reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(nb, 2)
    out[zero_block] = 0  # memset(&y[i], 0, ...); d = fp16(0) is 0x0000
    return out


_K_BLOCK_FUNCS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    QT.Q4_K: _q4_k_blocks,
    QT.Q5_K: _q5_k_blocks,
    QT.Q6_K: _q6_k_blocks,
}


def _run_k(qtype: GGMLQuantizationType, blocks: np.ndarray) -> np.ndarray:
    # inf/NaN intermediates are part of ggml's arithmetic on degenerate (subnormal) blocks
    with np.errstate(all="ignore"):
        return _K_BLOCK_FUNCS[qtype](blocks)


def _quantize_k(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    blocks = _as_blocks(x, f"quantize {qtype.name}")
    rows, cols = np.shape(x)
    if not np.isfinite(blocks).all():
        raise ValueError(f"quantize {qtype.name}: input contains NaN or Inf")
    type_size = GGML_QUANT_SIZES[qtype][1]
    if blocks.shape[0] == 0:
        return np.empty((rows, 0), dtype=np.uint8)
    return _run_k(qtype, blocks).reshape(rows, cols // QK_K * type_size)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K bytes of a float32 (rows, cols) array, cols % 256 == 0 -> uint8 (rows, cols/256*144)."""
    return _quantize_k(x, QT.Q4_K)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """Q5_K bytes of a float32 (rows, cols) array, cols % 256 == 0 -> uint8 (rows, cols/256*176)."""
    return _quantize_k(x, QT.Q5_K)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K bytes of a float32 (rows, cols) array, cols % 256 == 0 -> uint8 (rows, cols/256*210)."""
    return _quantize_k(x, QT.Q6_K)


# ----------------------------------------------------------------------------
# Single entry point, chunked and threaded
# ----------------------------------------------------------------------------

_GGUF_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.F16, QT.BF16, QT.F32)
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (QT.Q4_K, QT.Q5_K, QT.Q6_K) + _GGUF_TYPES


def quantized_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes the tensor data takes in a GGUF file for this type."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % block_size:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block size {block_size}")
    return n // block_size * type_size


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def quantize(
    x: np.ndarray,
    qtype: GGMLQuantizationType,
    *,
    threads: int | None = None,
    chunk_values: int = _CHUNK_VALUES,
    name: str = "tensor",
    on_rows: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Quantize ``x`` (any shape, last axis = ne[0]) to ``qtype`` as llama.cpp would.

    Returns what ``GGUFWriter.add_tensor(name, arr, raw_dtype=qtype)`` expects:
    uint8 ``(*lead, bytes_per_row)`` for block types and BF16, float16 for F16 and
    float32 for F32. Q4_K/Q5_K/Q6_K use this module's ggml-exact quantizers,
    the other types ``gguf.quants.quantize`` (bit-exact with ggml's reference).

    Rows are processed in chunks of about ``chunk_values`` values on ``threads``
    threads; ``on_rows(n)`` is called after each chunk (for a progress bar).
    """
    qtype = QT(qtype)
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"{name}: cannot quantize to {qtype.name}; supported types: {names}")
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name}: cannot quantize a scalar")
    if x.dtype != F32:
        x = x.astype(F32)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    ne0 = x.shape[-1]
    if ne0 % block_size != 0:
        raise ValueError(
            f"{name}: row length (ne[0]) {ne0} is not a multiple of the {qtype.name} block size "
            f"{block_size}; pick another type for this tensor (tensor_qtype() applies llama.cpp's fallbacks)"
        )
    if qtype == QT.F32:
        if on_rows is not None:
            on_rows(int(np.prod(x.shape[:-1], dtype=np.int64)))
        return np.ascontiguousarray(x)

    lead = x.shape[:-1]
    rows = x.reshape(-1, ne0)
    nrows = rows.shape[0]
    if qtype == QT.F16:
        out = np.empty((nrows, ne0), dtype=np.float16)
    else:
        out = np.empty((nrows, ne0 // block_size * type_size), dtype=np.uint8)

    step = max(1, chunk_values // max(ne0, 1))
    starts = range(0, nrows, step)

    def work(r0: int) -> int:
        chunk = rows[r0 : r0 + step]
        if not np.isfinite(chunk).all():
            bad = r0 + int(np.nonzero(~np.isfinite(chunk).all(axis=1))[0][0])
            raise ValueError(f"{name}: row {bad} contains NaN or Inf; fix the weights before exporting")
        if qtype in _K_BLOCK_FUNCS:
            res = _run_k(qtype, np.ascontiguousarray(chunk).reshape(-1, QK_K))
        else:
            res = gguf_quants.quantize(chunk, qtype)
        out[r0 : r0 + len(chunk)] = res.reshape(len(chunk), -1).view(out.dtype)
        return len(chunk)

    n_threads = threads or _default_threads()
    if n_threads <= 1 or len(starts) <= 1:
        for r0 in starts:
            n = work(r0)
            if on_rows is not None:
                on_rows(n)
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for n in pool.map(work, starts):
                if on_rows is not None:
                    on_rows(n)
    return out.reshape(*lead, out.shape[-1])


# ----------------------------------------------------------------------------
# llama.cpp type recipe (src/llama-quant.cpp)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FtypeInfo:
    name: str  # CLI name, as llama-quantize spells it (lower case)
    file_type: LlamaFileType  # value of general.file_type
    default_type: GGMLQuantizationType  # llama_ftype_get_default_type


FTYPES: dict[str, FtypeInfo] = {
    "f32": FtypeInfo("f32", LlamaFileType.ALL_F32, QT.F32),
    "f16": FtypeInfo("f16", LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": FtypeInfo("bf16", LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": FtypeInfo("q8_0", LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    "q4_0": FtypeInfo("q4_0", LlamaFileType.MOSTLY_Q4_0, QT.Q4_0),
    "q4_k_m": FtypeInfo("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, QT.Q4_K),
    "q5_k_m": FtypeInfo("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, QT.Q5_K),
    "q6_k": FtypeInfo("q6_k", LlamaFileType.MOSTLY_Q6_K, QT.Q6_K),
}

_QUANTIZED = {QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K}
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def _ftype(ftype: str) -> FtypeInfo:
    key = ftype.lower()
    if key not in FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; choose one of {', '.join(FTYPES)}")
    return FTYPES[key]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer selector for the extra-precision attn_v / ffn_down layers."""
    # C integer division and modulo; (i - n/8) >= 0 whenever the first test fails.
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _allows_quantization(name: str, n_dims: int) -> bool:
    # tensor_allows_quantization, restricted to what a LLaMA model contains
    # (quantize_output_tensor defaults to true).
    return n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _layer_of(name: str) -> int:
    m = _LAYER_RE.match(name)
    if m is None:
        raise ValueError(f"cannot find the layer index in tensor name {name!r} (expected 'blk.N.')")
    return int(m.group(1))


def _fallback(qtype: GGMLQuantizationType, ne0: int) -> GGMLQuantizationType:
    """tensor_type_fallback: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, then F16."""
    block = GGML_QUANT_SIZES[qtype][0]
    if ne0 % block == 0:
        return qtype
    if qtype in _FALLBACK:
        new = _FALLBACK[qtype]
    elif block <= 32:
        new = qtype  # already a 32-block type: nothing smaller to demote to
    else:
        raise ValueError(f"no tensor type fallback is defined for type {qtype.name}")
    if ne0 % GGML_QUANT_SIZES[new][0] != 0:
        new = QT.F16  # "must use F16 due to unusual shape"
    return new


def tensor_qtype(
    name: str,
    shape: Sequence[int],
    ftype: str,
    *,
    n_layers: int,
    tied: bool,
    source_type: GGMLQuantizationType = QT.F32,
) -> GGMLQuantizationType:
    """The GGML type ``llama-quantize`` (no imatrix, default options) gives one LLaMA tensor.

    ``name`` is the GGUF tensor name (``blk.3.attn_v.weight``), ``shape`` the
    numpy shape ``(…, ne[0])`` (the last axis is the row length), ``ftype`` one of
    ``FTYPES``, ``n_layers`` the block count, ``tied`` whether the model has no
    ``output.weight``. Tensors llama.cpp never quantizes (1-D tensors, norms) keep
    ``source_type``. For f32/f16/bf16 every other tensor simply takes that type.

    The layer index of attn_v / ffn_down is read from the name; llama.cpp counts
    those tensors in processing order (sorted by layer), which is the same thing
    for a model that has them in every layer.
    """
    info = _ftype(ftype)
    n_dims = len(shape)
    ne0 = int(shape[-1]) if n_dims else 1
    if not _allows_quantization(name, n_dims):
        return QT(source_type)
    default = info.default_type
    if default not in _QUANTIZED:  # F32 / F16 / BF16: no mix, no fallback
        return default

    ft = info.file_type
    new = default
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # The output matrix (or the token embedding that doubles as it).
        if ne0 % GGML_QUANT_SIZES[default][0] != 0:
            new = QT.Q8_0
        elif new != QT.Q8_0:
            new = QT.Q6_K
    elif "attn_v.weight" in name:
        if ft in (LlamaFileType.MOSTLY_Q4_K_M, LlamaFileType.MOSTLY_Q5_K_M) and use_more_bits(
            _layer_of(name), n_layers
        ):
            new = QT.Q6_K
    elif "ffn_down" in name:
        if ft in (LlamaFileType.MOSTLY_Q4_K_M, LlamaFileType.MOSTLY_Q5_K_M) and use_more_bits(
            _layer_of(name), n_layers
        ):
            new = QT.Q6_K
        # Q4_0 -> Q4_1 for the first layers only happens with an imatrix.
    return _fallback(new, ne0)


def tensor_types(
    shapes: Mapping[str, Sequence[int]],
    ftype: str,
    *,
    n_layers: int,
    source_types: Mapping[str, GGMLQuantizationType] | None = None,
) -> dict[str, GGMLQuantizationType]:
    """``tensor_qtype`` for a whole model: ``{name: numpy shape}`` -> ``{name: type}``.

    Embeddings count as tied when there is no ``output.weight``, as in llama.cpp.
    """
    tied = "output.weight" not in shapes
    src = source_types or {}
    return {
        name: tensor_qtype(name, shape, ftype, n_layers=n_layers, tied=tied, source_type=src.get(name, QT.F32))
        for name, shape in shapes.items()
    }
