"""Export a RODIN model to GGUF for llama.cpp, Ollama and LM Studio, quantized in one pass.

    python -m export.gguf --model runs/rodin-1b/final --quant q4_k_m

Reads our model directory, an HF Llama directory (the released `rodin-llm/rodin-1b` included) or
a `.pt` checkpoint, and writes the GGUF with the `gguf` package in a single pass: tensor infos
first (every type and size is known from the shapes), then each tensor is read, permuted,
quantized and written before the next one is read. There is no intermediate f16 file and the
whole model is never in memory (the token embedding is even streamed by row chunks).

What llama.cpp expects (see docs/export.md): Q/K rows permuted for its NORM RoPE, tied
embeddings without `output.weight`, norms in F32, the llama.cpp per-tensor type recipe of
`llama-quantize` (`export.quants.tensor_qtype`), SentencePiece vocab with the ChatML markers
typed CONTROL, BOS/EOS/UNK/PAD, `add_space_prefix` as trained and the chat template.

Beyond llama.cpp: with an FFN that is not a multiple of 256 (RODIN-1B: 5461) llama.cpp falls
back to F16 for every `ffn_down`. `--pad-ffn` (default for the k-quants) zero-pads the FFN to
the next multiple of 256: gate/up get zero rows and down zero columns, so the model computes
exactly the same function and every matrix becomes K-quantizable. `--no-pad-ffn` reproduces
llama.cpp's file exactly.

The file is written as `.NAME.tmp-*` next to the output and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from export.quants import FTYPES, quantize, quantized_nbytes, tensor_qtype
from export.source import ModelSource, open_source
from rodin.chat import IM_END
from rodin.tokenizer import CHATML_SYMBOLS, Tokenizer

QUANTS = tuple(FTYPES)  # f32 f16 bf16 q8_0 q4_0 q4_k_m q5_k_m q6_k
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
FFN_PAD_MULTIPLE = 256
ROW_CHUNK_VALUES = 1 << 23  # values per streamed chunk of a large matrix (32 MB in fp32)

# Our parameter names -> GGUF tensor names ({i} = layer).
GGUF_NAMES = {
    "tok_emb.weight": "token_embd.weight",
    "blocks.{i}.attn_norm.weight": "blk.{i}.attn_norm.weight",
    "blocks.{i}.attn.wq.weight": "blk.{i}.attn_q.weight",
    "blocks.{i}.attn.wk.weight": "blk.{i}.attn_k.weight",
    "blocks.{i}.attn.wv.weight": "blk.{i}.attn_v.weight",
    "blocks.{i}.attn.wo.weight": "blk.{i}.attn_output.weight",
    "blocks.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "blocks.{i}.ffn.w1.weight": "blk.{i}.ffn_gate.weight",
    "blocks.{i}.ffn.w3.weight": "blk.{i}.ffn_up.weight",
    "blocks.{i}.ffn.w2.weight": "blk.{i}.ffn_down.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(name: str) -> str:
    m = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{m.group(1)}.", ".{i}.", 1) if m else name
    if key not in GGUF_NAMES:
        raise KeyError(f"no GGUF name for parameter {name!r}")
    return GGUF_NAMES[key].replace("{i}", m.group(1) if m else "")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half rows -> llama.cpp NORM RoPE rows (convert_hf_to_gguf's LlamaModel.permute)."""
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def padded_ffn(ffn_dim: int, multiple: int = FFN_PAD_MULTIPLE) -> int:
    return -(-ffn_dim // multiple) * multiple


# ----------------------------------------------------------------------------- tokenizer


def vocab_metadata(tok: Tokenizer, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """tokens, scores and llama.cpp token types for the GGUF vocab (padded to n_vocab rows).

    Like convert_hf_to_gguf's SentencePiece path, except that the ChatML markers (SentencePiece
    user-defined pieces) are typed CONTROL: llama.cpp then matches them as single tokens when
    parsing specials, and they are what HF marks special.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    tokens, scores, types = [], [], []
    TT = gguf.TokenType
    for i, p in enumerate(proto.pieces):
        tokens.append(p.piece.encode("utf-8"))
        scores.append(float(p.score))
        if p.type == pb.ModelProto.SentencePiece.UNKNOWN:
            types.append(TT.UNKNOWN)
        elif p.type == pb.ModelProto.SentencePiece.CONTROL:
            types.append(TT.CONTROL)
        elif p.type == pb.ModelProto.SentencePiece.UNUSED:
            types.append(TT.UNUSED)
        elif p.type == pb.ModelProto.SentencePiece.BYTE:
            types.append(TT.BYTE)
        elif p.type == pb.ModelProto.SentencePiece.USER_DEFINED:
            types.append(TT.CONTROL if p.piece in CHATML_SYMBOLS else TT.USER_DEFINED)
        else:
            types.append(TT.NORMAL)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TT.UNUSED)
    return tokens, scores, [int(t) for t in types]


# ----------------------------------------------------------------------------- plan


@dataclass
class TensorPlan:
    source: str  # our parameter name
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy shape written (after padding)
    qtype: QT
    nbytes: int


def plan_tensors(src: ModelSource, quant: str, ffn_dim: int) -> list[TensorPlan]:
    cfg = src.cfg
    plans = []
    for name, shape in src.shapes.items():
        g = gguf_name(name)
        if ffn_dim != cfg.ffn_dim:
            if g.endswith(("ffn_gate.weight", "ffn_up.weight")):
                shape = (ffn_dim, shape[1])
            elif g.endswith("ffn_down.weight"):
                shape = (shape[0], ffn_dim)
        qtype = tensor_qtype(g, shape, quant, n_layers=cfg.n_layers, tied=cfg.tie_embeddings)
        plans.append(TensorPlan(name, g, tuple(shape), QT(qtype), quantized_nbytes(shape, qtype)))
    return plans


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy()


def _encode(x: np.ndarray, qtype: QT, name: str) -> np.ndarray:
    """Bytes of `x` (float32) in `qtype` as written to the file (flat uint8 / f16 / f32 array)."""
    return quantize(x, qtype, name=name)


def tensor_data(src: ModelSource, plan: TensorPlan, ffn_dim: int):
    """Yield the encoded data of one tensor, in row chunks for large matrices."""
    cfg = src.cfg
    name, g = plan.source, plan.name
    rows = plan.shape[0]
    if len(plan.shape) == 2 and plan.shape == src.shapes[name] and rows * plan.shape[1] > ROW_CHUNK_VALUES \
            and not g.endswith(("attn_q.weight", "attn_k.weight")):
        step = max(1, ROW_CHUNK_VALUES // plan.shape[1])
        for r0 in range(0, rows, step):
            yield _encode(_to_numpy(src.get_rows(name, r0, min(rows, r0 + step))), plan.qtype, g)
        return
    x = _to_numpy(src.get(name))
    if g.endswith("attn_q.weight"):
        x = permute_qk(x, cfg.n_heads)
    elif g.endswith("attn_k.weight"):
        x = permute_qk(x, cfg.n_kv_heads)
    if plan.shape != x.shape:  # FFN zero padding
        padded = np.zeros(plan.shape, dtype=np.float32)
        padded[: x.shape[0], : x.shape[1]] = x
        x = padded
    yield _encode(x, plan.qtype, g)


# ----------------------------------------------------------------------------- export


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_output_name(model_name: str, quant: str) -> str:
    return f"{model_name}-{quant.upper()}.gguf"


def write_gguf(src: ModelSource, out: Path, quant: str, tok: Tokenizer, *, pad_ffn: bool, chat_template: str | None,
               name: str, license: str | None, progress: bool = True) -> list[TensorPlan]:
    """Write the GGUF to `out` (a temporary path: the caller renames it)."""
    cfg = src.cfg
    ffn_dim = padded_ffn(cfg.ffn_dim) if pad_ffn else cfg.ffn_dim
    plans = plan_tensors(src, quant, ffn_dim)
    info = FTYPES[quant]

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_type("model")
    w.add_name(name)
    w.add_basename(name)
    w.add_size_label(gguf.size_label(cfg.num_parameters(), 0, 0, 0))
    if license:
        w.add_license(license)
    w.add_languages(["fr"])
    w.add_tags(["rodin", "french"] + (["chatml"] if chat_template else []))
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(info.file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, scores, types = vocab_metadata(tok, cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    if tok.pad_id >= 0:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(bool(tok.add_dummy_prefix))
    if chat_template:
        w.add_chat_template(chat_template)
        # Default sampling for llama.cpp front ends, as in the HF generation_config of chat models.
        w.add_sampling_temp(0.7)
        w.add_sampling_top_p(0.9)
        if tok.has_atomic_chatml:
            w.add_eot_token_id(tok.piece_to_id(IM_END))

    for p in plans:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, desc=f"{out.name} {quant}")
    try:
        for p in plans:
            _write_tensor(w, p, tensor_data(src, p, ffn_dim))
            if bar is not None:
                bar.update(p.nbytes)
                bar.set_postfix_str(f"{p.name} {p.qtype.name}")
    finally:
        if bar is not None:
            bar.close()
        w.close()
    return plans


def _write_tensor(w: gguf.GGUFWriter, p: TensorPlan, chunks) -> None:
    """Write one tensor's data chunk by chunk, with gguf's alignment and size check."""
    assert w.fout is not None
    fout = w.fout[0]
    ti = w.tensors[0].pop(p.name)
    w.write_padding(fout, fout.tell())
    written = 0
    for c in chunks:
        c = np.ascontiguousarray(c)
        c.tofile(fout)
        written += c.nbytes
    if written != ti.nbytes:
        raise RuntimeError(f"{p.name}: wrote {written} bytes, expected {ti.nbytes}")
    w.write_padding(fout, written)
    w.state = gguf.gguf_writer.WriterState.WEIGHTS


def export_gguf(model: str | os.PathLike, out: str | os.PathLike | None = None, *, quant: str = "q4_k_m",
                pad_ffn: bool | None = None, tokenizer: str | os.PathLike | None = None, chat: bool | None = None,
                name: str | None = None, license: str | None = None, progress: bool = True) -> Path:
    """Export `model` to a GGUF file; returns its path. Nothing appears under `out` unless complete.

    pad_ffn None = on for the k-quants when the FFN is not a multiple of 256.
    chat None follows the source (chat template saved with it).
    """
    quant = quant.lower()
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    with open_source(model) as src:
        info, cfg = src.info, src.cfg
        tok_path = Path(tokenizer) if tokenizer else info.tokenizer_path
        if tok_path is None:
            raise FileNotFoundError(f"{info.path}: no tokenizer.model next to the weights; pass --tokenizer PATH")
        tok = Tokenizer(tok_path)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer {tok.path} has {tok.vocab_size} pieces but the model's embedding only "
                             f"{cfg.vocab_size} rows; they do not belong together")
        if pad_ffn is None:
            pad_ffn = quant in K_QUANTS
        pad_ffn = pad_ffn and cfg.ffn_dim % FFN_PAD_MULTIPLE != 0
        is_chat = info.is_chat if chat is None else chat
        template = None
        if is_chat:
            from rodin.chat import jinja_template

            template = info.chat_template or jinja_template()
        meta = info.metadata or {}
        name = name or meta.get("name") or cfg.name
        out = Path(out) if out else Path(default_output_name(name, quant))
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        try:
            write_gguf(src, tmp, quant, tok, pad_ffn=pad_ffn, chat_template=template, name=name,
                       license=license or meta.get("license"), progress=progress)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.gguf", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m export.gguf --model runs/rodin-1b/final --quant q4_k_m\n"
               "  python -m export.gguf --model ~/hf/rodin-1b-instruct --quant q8_0 --out rodin-1b-instruct-Q8_0.gguf "
               "--modelfile\n"
               "  python -m export.gguf --model ~/hf/rodin-1b --quant q4_k_m --no-pad-ffn   # same tensors as llama.cpp")
    p.add_argument("--model", required=True, help="our model directory, an HF Llama directory or a .pt checkpoint")
    p.add_argument("--quant", default="q4_k_m", choices=QUANTS, help="file type (default q4_k_m)")
    p.add_argument("--out", help="output .gguf (default: NAME-QUANT.gguf in the current directory)")
    pad = p.add_mutually_exclusive_group()
    pad.add_argument("--pad-ffn", dest="pad_ffn", action="store_true", default=None,
                     help=f"zero-pad the FFN to a multiple of {FFN_PAD_MULTIPLE} so every matrix is K-quantized "
                          f"(default for q4_k_m, q5_k_m, q6_k; exact same function)")
    pad.add_argument("--no-pad-ffn", dest="pad_ffn", action="store_false",
                     help="keep the FFN size: tensor types identical to llama.cpp's quantizer")
    p.add_argument("--tokenizer", help="tokenizer.model to use when the source has none next to it")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="embed the ChatML chat template (default: when the source is a chat model)")
    chat.add_argument("--base", dest="chat", action="store_false", help="no chat template (raw completion model)")
    p.add_argument("--name", help="general.name (default: the model config's name)")
    p.add_argument("--license", help="general.license, e.g. apache-2.0")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        out = export_gguf(a.model, a.out, quant=a.quant, pad_ffn=a.pad_ffn, tokenizer=a.tokenizer, chat=a.chat,
                          name=a.name, license=a.license, progress=not a.no_progress)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        if a.modelfile:
            from export.ollama import write_modelfile

            print(f"wrote {write_modelfile(out)}")
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
