"""Shared fixtures for export tests: a minimal F32 llama-arch GGUF and llama.cpp's quantizer.

``write_tiny_llama_gguf`` writes just enough for ``llama_model_quantize`` (and the
llama.cpp loader) to accept the file: the required ``llama.*`` hyper-parameters, a
small SentencePiece-style vocab (unk/bos/eos, the 256 byte tokens, a few pieces)
and random F32 weights in HF ``[out, in]`` layout. It is a test helper only; the
real GGUF exporter lives in ``export/gguf.py``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest


@dataclass(frozen=True)
class TinyLlama:
    dim: int = 256
    ffn: int = 512
    n_layers: int = 8
    n_head: int = 2
    vocab: int = 320
    ctx: int = 128
    tied: bool = True
    seed: int = 0


def tiny_llama_tensors(cfg: TinyLlama) -> dict[str, np.ndarray]:
    """Random F32 weights, numpy shapes (out, in), with GGUF tensor names."""
    rng = np.random.default_rng(cfg.seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t: dict[str, np.ndarray] = {"token_embd.weight": mat(cfg.vocab, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(cfg.dim)
        t[p + "attn_q.weight"] = mat(cfg.dim, cfg.dim)
        t[p + "attn_k.weight"] = mat(cfg.dim, cfg.dim)
        t[p + "attn_v.weight"] = mat(cfg.dim, cfg.dim)
        t[p + "attn_output.weight"] = mat(cfg.dim, cfg.dim)
        t[p + "ffn_norm.weight"] = norm(cfg.dim)
        t[p + "ffn_gate.weight"] = mat(cfg.ffn, cfg.dim)
        t[p + "ffn_up.weight"] = mat(cfg.ffn, cfg.dim)
        t[p + "ffn_down.weight"] = mat(cfg.dim, cfg.ffn)
    t["output_norm.weight"] = norm(cfg.dim)
    if not cfg.tied:
        t["output.weight"] = mat(cfg.vocab, cfg.dim)
    return t


def _tiny_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    letters = "abcdefghijklmnopqrstuvwxyzéèàç"
    pieces = ["\u2581" + c for c in letters] + list(letters)
    pieces += [f"\u2581{a}{b}" for a in letters for b in letters]
    if n < len(tokens):
        raise ValueError(f"vocab must hold at least {len(tokens)} tokens, got {n}")
    for k, piece in enumerate(pieces[: n - len(tokens)]):
        tokens.append(piece)
        scores.append(-float(k))
        types.append(gguf.TokenType.NORMAL)
    if len(tokens) != n:
        raise ValueError(f"vocab size {n} is too large for the tiny test vocab")
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama_gguf(path: Path, cfg: TinyLlama = TinyLlama()) -> dict[str, np.ndarray]:
    """Write an ALL_F32 llama GGUF at ``path``; returns the tensors written."""
    tensors = tiny_llama_tensors(cfg)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_context_length(cfg.ctx)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(cfg.dim // cfg.n_head)
    w.add_vocab_size(cfg.vocab)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    tokens, scores, types = _tiny_vocab(cfg.vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def llama_cpp_quantize(src: Path, dst: Path, ftype: int, nthread: int = 2) -> None:
    """Run llama.cpp's own quantizer (``llama_model_quantize``, default params)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype={ftype}) failed with {rc}")


def read_gguf_tensors(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray, tuple[int, ...]]]:
    """``{name: (type, raw data as stored, ne shape)}`` from a GGUF file."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        out[t.name] = (gguf.GGMLQuantizationType(t.tensor_type), np.array(t.data), tuple(int(s) for s in t.shape))
    return out


@pytest.fixture(scope="session")
def tiny_llama_f32_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """(path, tensors) of an ALL_F32 GGUF for ``TinyLlama()`` (8 layers, dim 256, tied)."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama-f32.gguf"
    return path, write_tiny_llama_gguf(path, TinyLlama())
