"""export.quants against llama.cpp: dequantization error, byte-exactness, type recipe.

llama.cpp is exercised two ways, both through llama-cpp-python's own build:
``llama_model_quantize`` on a tiny F32 GGUF (the path ``llama-quantize`` takes),
and ``ggml_quantize_chunk`` from its ``libggml-base`` for hand-made edge cases.
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from export.quants import (
    FTYPES,
    quantize,
    quantize_q4_k,
    quantize_q5_k,
    quantize_q6_k,
    quantized_nbytes,
    tensor_qtype,
    tensor_types,
    use_more_bits,
)
from tests.export.conftest import TinyLlama, llama_cpp_quantize, read_gguf_tensors, write_tiny_llama_gguf

QT = gguf.GGMLQuantizationType
K_QUANTS = {QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k, QT.Q6_K: quantize_q6_k}

# Error bounds on realistic data (|x| around 1e-2..1), per type:
# (relative RMS error on Gaussian weights, max |error| / 256-block absmax on any data).
# A sub-block spans at most 2*absmax, so one step is at most 2/15 (Q4_K), 2/31 (Q5_K) or
# 1/32 (Q6_K, signed levels) of absmax; the error is about half a step, plus the rounding
# of the 6-bit sub-scales and of the fp16 super-scales (margins below).
BOUNDS = {QT.Q4_K: (0.08, 0.1), QT.Q5_K: (0.04, 0.05), QT.Q6_K: (0.02, 0.025)}

MIN_IDENTICAL = 0.99  # fraction of blocks that must be byte-identical to llama.cpp


def _ggml_lib() -> ctypes.CDLL:
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    return lib


def ggml_quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    """llama.cpp's C quantizer (no imatrix: the *_ref path llama-quantize uses)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
    _ggml_lib().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    return out


def identical_blocks(ours: np.ndarray, ref: np.ndarray, qtype: QT) -> tuple[int, int]:
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    a = np.asarray(ours).view(np.uint8).reshape(-1, size)
    b = np.asarray(ref).view(np.uint8).reshape(-1, size)
    assert a.shape == b.shape
    return int((a == b).all(axis=1).sum()), a.shape[0]


def edge_cases(rows: int = 8, cols: int = 512) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    n = (rows, cols)
    out = {
        "gaussian": rng.standard_normal(n) * 0.02,
        "heavy_tailed": rng.standard_t(2, n) * 0.01,
        "positive_only": rng.uniform(0.1, 1.0, n),
        "negative_only": -rng.uniform(0.1, 1.0, n),
        "small": rng.standard_normal(n) * 1e-3,
        "zeros": np.zeros(n),
        "constant_pos": np.full(n, 0.37),
        "constant_neg": np.full(n, -0.37),
        "tiny": rng.standard_normal(n) * 1e-6,
    }
    x = rng.standard_normal(n) * 0.02
    x[:, 5::256] = 100.0  # one huge outlier per 256-block
    out["outlier"] = x
    x = rng.standard_normal(n) * 0.02
    x[:, 64:96] = 0.0  # one all-zero sub-block per block
    x[rng.random(n) < 0.3] = 0.0
    out["sparse"] = x
    return {k: v.astype(np.float32) for k, v in out.items()}


CASES = edge_cases()


def _err_stats(x: np.ndarray, qtype: QT) -> tuple[np.ndarray, float, float]:
    y = gguf.quants.dequantize(K_QUANTS[qtype](x), qtype)
    err = np.abs(y - x).reshape(-1, 256)
    amax = np.abs(x).reshape(-1, 256).max(axis=1)
    ratio = float((err.max(axis=1) / np.where(amax > 0, amax, 1)).max())
    rel = float(np.sqrt(((y - x) ** 2).mean()) / np.sqrt((x**2).mean()))
    return y, ratio, rel


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
@pytest.mark.parametrize("case", ["gaussian", "heavy_tailed", "positive_only", "negative_only", "sparse"])
def test_dequantized_error_within_bounds(qtype, case):
    x = CASES[case]
    out = K_QUANTS[qtype](x)
    assert out.dtype == np.uint8
    assert out.shape == (x.shape[0], x.shape[1] // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    _, ratio, rel = _err_stats(x, qtype)
    max_rel, max_ratio = BOUNDS[qtype]
    assert ratio <= max_ratio, f"max error {ratio:.4f} x block absmax"
    if case == "gaussian":
        assert rel <= max_rel, f"relative RMS error {rel:.4f}"


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
def test_zero_rows_are_zero_bytes(qtype):
    out = K_QUANTS[qtype](CASES["zeros"])
    assert not out.any()
    assert not gguf.quants.dequantize(out, qtype).any()


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
@pytest.mark.parametrize("case", ["constant_pos", "constant_neg"])
def test_constant_rows(qtype, case):
    x = CASES[case]
    y = gguf.quants.dequantize(K_QUANTS[qtype](x), qtype)
    np.testing.assert_allclose(y, x, rtol=1e-3)  # fp16 super-scale rounding only


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
def test_small_and_tiny_values(qtype):
    # 1e-3 weights: fp16 super-scales become subnormal, precision degrades a little.
    _, ratio, _ = _err_stats(CASES["small"], qtype)
    assert ratio <= 2 * BOUNDS[qtype][1]
    # 1e-6 weights: the fp16 super-scale d underflows to 0, as in llama.cpp; the output
    # must still be finite and of the input's magnitude (and match llama.cpp, below).
    y, ratio, _ = _err_stats(CASES["tiny"], qtype)
    assert np.isfinite(y).all()
    assert ratio <= 4.0


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
def test_outlier_block(qtype):
    x = CASES["outlier"]
    y, ratio, _ = _err_stats(x, qtype)
    np.testing.assert_allclose(y[:, 5::256], 100.0, rtol=0.01)  # the outlier survives
    assert ratio <= BOUNDS[qtype][1]
    # the other sub-blocks lose their resolution (their scale rounds to 0 against the outlier's)
    # but stay within their own range
    assert np.abs(y - x)[:, 32:256].max() <= 2 * np.abs(x[:, 32:256]).max()


# --------------------------------------------------------------------------- byte-exactness vs ggml C


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
def test_bytes_match_ggml_reference_on_edge_cases(qtype):
    for name, x in CASES.items():
        same, total = identical_blocks(K_QUANTS[qtype](x), ggml_quantize(x, qtype), qtype)
        assert same / total >= MIN_IDENTICAL, f"{name}: {same}/{total} blocks identical"


@pytest.mark.parametrize("qtype", list(K_QUANTS), ids=lambda t: t.name)
def test_bytes_match_ggml_reference_random(qtype):
    rng = np.random.default_rng(7)
    # per-row scales over 8 orders of magnitude, offsets and heavy tails
    x = rng.standard_t(4, (256, 1024)) * 10.0 ** rng.uniform(-4, 2, (256, 1)) + rng.normal(0, 0.01, (256, 1))
    x = x.astype(np.float32)
    same, total = identical_blocks(K_QUANTS[qtype](x), ggml_quantize(x, qtype), qtype)
    print(f"{qtype.name}: {same}/{total} blocks identical to ggml_quantize_chunk")
    assert same == total


# --------------------------------------------------------------------------- llama_model_quantize on a GGUF

MAIN = TinyLlama()  # dim 256, ffn 512, 8 layers, tied: the tiny_llama_f32_gguf fixture


def _compare_with_llama_cpp(src: Path, tensors: dict[str, np.ndarray], cfg: TinyLlama, ftype: str, tmp: Path):
    """Quantize with llama.cpp and with us; return (types ok, per-type identical block counts)."""
    info = FTYPES[ftype]
    dst = tmp / f"{src.stem}-{ftype}.gguf"
    llama_cpp_quantize(src, dst, int(info.file_type))
    ref = read_gguf_tensors(dst)
    assert set(ref) == set(tensors)

    expected = tensor_types({k: v.shape for k, v in tensors.items()}, ftype, n_layers=cfg.n_layers)
    got = {name: ref[name][0] for name in tensors}
    assert got == expected, {k: (got[k].name, expected[k].name) for k in got if got[k] != expected[k]}

    r = gguf.GGUFReader(str(dst))
    assert r.fields["general.file_type"].contents() == int(info.file_type)

    counts: Counter = Counter()
    totals: Counter = Counter()
    for name, arr in tensors.items():
        qtype, data, ne = ref[name]
        assert ne == tuple(reversed(arr.shape))
        ours = quantize(arr, qtype, name=name)
        if qtype in gguf.GGML_QUANT_SIZES and gguf.GGML_QUANT_SIZES[qtype][0] > 1:
            same, total = identical_blocks(ours, data, qtype)
        else:  # F32 / F16 / BF16 element types
            a = np.asarray(ours).view(np.uint8).ravel()
            b = np.asarray(data).view(np.uint8).ravel()
            same, total = int(np.array_equal(a, b)), 1
        counts[qtype] += same
        totals[qtype] += total
    return counts, totals


@pytest.mark.parametrize("ftype", ["q4_k_m", "q5_k_m", "q6_k"])
def test_llama_quantize_types_and_bytes(tiny_llama_f32_gguf, tmp_path, ftype):
    src, tensors = tiny_llama_f32_gguf
    counts, totals = _compare_with_llama_cpp(src, tensors, MAIN, ftype, tmp_path)
    report = {t.name: f"{counts[t]}/{totals[t]}" for t in totals}
    print(f"{ftype}: identical blocks per type {report}")
    for t in totals:
        assert counts[t] / totals[t] >= MIN_IDENTICAL, report
    k_types = {t for t in totals if t in K_QUANTS}
    assert k_types, "the recipe should produce K-quant tensors"


# Row lengths that are multiples of 32 but not of 256 (K-quant fallbacks, tied Q8_0 token_embd),
# and an FFN whose ffn_down rows are not even a multiple of 32 (F16).
FALLBACK_CONFIGS = {
    "ne0_mult32": TinyLlama(dim=288, ffn=352, n_layers=3, n_head=2, vocab=300, tied=True, seed=2),
    "ne0_odd_untied": TinyLlama(dim=256, ffn=200, n_layers=2, n_head=2, vocab=300, tied=False, seed=3),
}


@pytest.mark.parametrize("config", list(FALLBACK_CONFIGS))
def test_recipe_fallbacks_match_llama_cpp(tmp_path, config):
    cfg = FALLBACK_CONFIGS[config]
    src = tmp_path / f"{config}-f32.gguf"
    tensors = write_tiny_llama_gguf(src, cfg)
    seen: set = set()
    for ftype in FTYPES:
        counts, totals = _compare_with_llama_cpp(src, tensors, cfg, ftype, tmp_path)
        for t in totals:
            assert counts[t] / totals[t] >= MIN_IDENTICAL, (ftype, t.name, counts[t], totals[t])
        seen |= set(totals)
    if config == "ne0_mult32":
        assert {QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_0} <= seen
    else:
        assert {QT.F16, QT.Q6_K, QT.Q4_K} <= seen


# --------------------------------------------------------------------------- recipe (pure)


def _rodin_1b_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (64000, 2048), "output_norm.weight": (2048,)}
    for i in range(22):
        p = f"blk.{i}."
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[p + n + ".weight"] = (2048, 2048)
        shapes[p + "ffn_gate.weight"] = (5461, 2048)
        shapes[p + "ffn_up.weight"] = (5461, 2048)
        shapes[p + "ffn_down.weight"] = (2048, 5461)
        shapes[p + "attn_norm.weight"] = (2048,)
        shapes[p + "ffn_norm.weight"] = (2048,)
    return shapes


def test_use_more_bits_for_22_layers():
    assert [i for i in range(22) if use_more_bits(i, 22)] == [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]


def test_rodin_1b_q4_k_m_recipe_and_size():
    shapes = _rodin_1b_shapes()
    types = tensor_types(shapes, "q4_k_m", n_layers=22)
    assert types["token_embd.weight"] == QT.Q6_K  # tied: quantized like the output matrix
    assert types["output_norm.weight"] == QT.F32
    for i in range(22):
        more = use_more_bits(i, 22)
        assert types[f"blk.{i}.attn_v.weight"] == (QT.Q6_K if more else QT.Q4_K)
        assert types[f"blk.{i}.ffn_down.weight"] == QT.F16  # 5461 % 32 != 0
        assert types[f"blk.{i}.ffn_gate.weight"] == QT.Q4_K
        assert types[f"blk.{i}.attn_q.weight"] == QT.Q4_K
    # data size from docs/gguf-llama.md section 5 (llama-quantize on this model)
    assert sum(quantized_nbytes(shapes[k], t) for k, t in types.items()) == 1_095_228_928


def test_recipe_other_ftypes():
    kw = dict(n_layers=22, tied=True)
    assert tensor_qtype("blk.3.attn_v.weight", (2048, 2048), "q5_k_m", **kw) == QT.Q5_K
    assert tensor_qtype("blk.4.attn_v.weight", (2048, 2048), "q5_k_m", **kw) == QT.Q6_K
    assert tensor_qtype("blk.4.ffn_down.weight", (2048, 4096), "q5_k_m", **kw) == QT.Q6_K
    assert tensor_qtype("blk.5.ffn_down.weight", (2048, 4096), "q5_k_m", **kw) == QT.Q5_K
    assert tensor_qtype("blk.5.ffn_down.weight", (2048, 4096 + 32), "q5_k_m", **kw) == QT.Q5_1
    assert tensor_qtype("blk.4.ffn_down.weight", (2048, 4096 + 32), "q5_k_m", **kw) == QT.Q8_0
    assert tensor_qtype("token_embd.weight", (64000, 2048), "q6_k", **kw) == QT.Q6_K
    assert tensor_qtype("token_embd.weight", (64000, 2048), "q8_0", **kw) == QT.Q8_0
    assert tensor_qtype("token_embd.weight", (64000, 2048), "q4_0", **kw) == QT.Q6_K
    assert tensor_qtype("token_embd.weight", (64000, 2048), "q4_k_m", n_layers=22, tied=False) == QT.Q4_K
    assert tensor_qtype("token_embd.weight", (64000, 2080), "q4_k_m", **kw) == QT.Q8_0
    assert tensor_qtype("output.weight", (64000, 2050), "q4_k_m", n_layers=22, tied=False) == QT.F16
    assert tensor_qtype("blk.0.ffn_down.weight", (2048, 5461), "q8_0", **kw) == QT.F16
    assert tensor_qtype("blk.0.ffn_down.weight", (2048, 5461), "bf16", **kw) == QT.BF16
    assert tensor_qtype("blk.0.attn_norm.weight", (2048,), "q8_0", **kw) == QT.F32
    assert tensor_qtype("blk.0.attn_q.weight", (2048, 2048), "f32", **kw) == QT.F32
    assert {k: int(v.file_type) for k, v in FTYPES.items()} == {
        "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18,
    }
    with pytest.raises(ValueError, match="unknown ftype"):
        tensor_qtype("blk.0.attn_q.weight", (256, 256), "q3_k_m", **kw)


# --------------------------------------------------------------------------- quantize() entry point


def test_quantize_dispatch_and_chunking():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((37, 512)) * 0.02).astype(np.float32)
    for qtype, fn in K_QUANTS.items():
        ref = fn(x)
        rows: list[int] = []
        chunked = quantize(x, qtype, threads=2, chunk_values=3 * 512, on_rows=rows.append)
        assert np.array_equal(chunked, ref)
        assert sum(rows) == 37
        assert np.array_equal(quantize(x, qtype, threads=1), ref)
    for qtype in (QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.F16, QT.BF16):
        assert np.array_equal(
            np.asarray(quantize(x, qtype, threads=2, chunk_values=1024)).view(np.uint8),
            np.asarray(gguf.quants.quantize(x, qtype)).view(np.uint8),
        )
    assert np.array_equal(quantize(x, QT.F32), x)
    # leading dimensions are kept, the last one becomes bytes
    assert quantize(x.reshape(37, 2, 256), QT.Q6_K).shape == (37, 2, 210)


def test_quantize_errors():
    x = np.zeros((4, 320), dtype=np.float32)
    with pytest.raises(ValueError, match=r"row length \(ne\[0\]\) 320 is not a multiple of the Q4_K block size 256"):
        quantize(x, QT.Q4_K, name="blk.0.ffn_down.weight")
    with pytest.raises(ValueError, match="not a multiple of 256"):
        quantize_q6_k(x)
    with pytest.raises(ValueError, match="not a multiple of the Q8_0 block size 32"):
        quantize(np.zeros((2, 40), np.float32), QT.Q8_0)
    y = np.zeros((4, 256), dtype=np.float32)
    y[2, 7] = np.nan
    with pytest.raises(ValueError, match="row 2 contains NaN or Inf"):
        quantize(y, QT.Q4_K, name="w")
    with pytest.raises(ValueError, match="cannot quantize to IQ2_XXS"):
        quantize(y, QT.IQ2_XXS)
