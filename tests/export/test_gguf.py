"""export.gguf end to end: llama.cpp (llama-cpp-python) loads every type and agrees with our model."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from export.gguf import QUANTS, export_gguf, main
from export.hf import export_hf
from export.quants import tensor_types
from export.verify import GGUFRunner, verify
from rodin.chat import IM_END, IM_START, jinja_template
from rodin.checkpoint import load_state_dict
from tests.export.conftest import llama_cpp_quantize, read_gguf_tensors
from tests.fixtures import FRENCH_TEXTS, TRICKY_TEXTS
from tests.helpers.tiny import EXPORT_TEST_SHAPE, cached_trained_model

llama_cpp = pytest.importorskip("llama_cpp")

# (max |logit diff|, min top-1 agreement, max perplexity ratio) against our fp32 model on
# export.verify's French prompts. Measured on the trained test model: f32 0.003/100 %,
# f16 0.006/100 %, bf16 0.02/99.7 %, q8_0 0.06/99.4 %, q4_0 0.54/98 %, q4_k_m 0.29/97.5 %,
# q5_k_m 0.22/97.8 %, q6_k 0.18/98 %, perplexity ratios within 0.1 %.
BOUNDS = {
    "f32": (0.01, 1.0, 1.001), "f16": (0.03, 0.99, 1.002), "bf16": (0.1, 0.98, 1.01),
    "q8_0": (0.25, 0.97, 1.01), "q4_0": (1.5, 0.9, 1.05), "q4_k_m": (1.0, 0.9, 1.05),
    "q5_k_m": (1.0, 0.9, 1.03), "q6_k": (0.6, 0.93, 1.02),
}
CHAT = f"{IM_START}system\nSois bref.{IM_END}\n{IM_START}user\nÇa va ?{IM_END}\n{IM_START}assistant\nOui !{IM_END}\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    return cached_trained_model(tmp_path_factory.getbasetemp(), tokenizer, chat=True, **EXPORT_TEST_SHAPE)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def exported(trained, gguf_dir):
    cache = {}

    def get(quant: str, pad_ffn: bool | None = None):
        key = (quant, pad_ffn)
        if key not in cache:
            cache[key] = export_gguf(trained, gguf_dir / f"{quant}-{pad_ffn}.gguf", quant=quant, pad_ffn=pad_ffn,
                                     progress=False)
        return cache[key]

    return get


def fields(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: (f.types, f.contents()) for k, f in r.fields.items()}


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_cpp_loads_and_matches(quant, exported, trained, tokenizer):
    max_diff, min_top1, max_ratio = BOUNDS[quant]
    rep = verify(trained, exported(quant))
    assert rep.tokenization_match
    assert rep.max_abs_logit_diff <= max_diff, rep
    assert rep.top1_agreement >= min_top1, rep
    assert rep.perplexity_ratio <= max_ratio, rep


def test_metadata_and_layout(exported, trained, tokenizer):
    cfg = load_state_dict(trained)[1].cfg
    path = exported("q4_k_m")
    f = fields(path)
    V = gguf.GGUFValueType
    expect = {
        "general.architecture": (V.STRING, "llama"), "llama.context_length": (V.UINT32, cfg.context_length),
        "llama.embedding_length": (V.UINT32, cfg.dim), "llama.block_count": (V.UINT32, cfg.n_layers),
        "llama.feed_forward_length": (V.UINT32, 768), "llama.attention.head_count": (V.UINT32, cfg.n_heads),
        "llama.attention.head_count_kv": (V.UINT32, cfg.n_kv_heads), "llama.rope.dimension_count": (V.UINT32, 64),
        "llama.vocab_size": (V.UINT32, cfg.vocab_size), "general.file_type": (V.UINT32, 15),
        "general.quantization_version": (V.UINT32, 2), "tokenizer.ggml.model": (V.STRING, "llama"),
        "tokenizer.ggml.bos_token_id": (V.UINT32, 2), "tokenizer.ggml.eos_token_id": (V.UINT32, 3),
        "tokenizer.ggml.unknown_token_id": (V.UINT32, 1), "tokenizer.ggml.padding_token_id": (V.UINT32, 0),
        "tokenizer.ggml.add_bos_token": (V.BOOL, True), "tokenizer.ggml.add_eos_token": (V.BOOL, False),
        "tokenizer.ggml.add_space_prefix": (V.BOOL, False), "tokenizer.chat_template": (V.STRING, jinja_template()),
        "general.license": (V.STRING, "apache-2.0"), "general.name": (V.STRING, "rodin-test"),
    }
    for key, (vtype, value) in expect.items():
        assert key in f, key
        assert f[key][0][0] == vtype and f[key][1] == value, (key, f[key])
    assert f["llama.rope.freq_base"][0][0] == V.FLOAT32 and f["llama.rope.freq_base"][1] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"][0][0] == V.FLOAT32
    types = f["tokenizer.ggml.token_type"][1]
    assert len(f["tokenizer.ggml.tokens"][1]) == cfg.vocab_size
    assert types[tokenizer.piece_to_id(IM_START)] == types[tokenizer.piece_to_id(IM_END)] == gguf.TokenType.CONTROL
    assert types[tokenizer.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
    tensors = read_gguf_tensors(path)
    assert len(tensors) == 2 + 9 * cfg.n_layers and "output.weight" not in tensors
    assert all(t == QT.F32 for n, (t, _, _) in tensors.items() if n.endswith("norm.weight"))
    assert tensors["blk.0.ffn_down.weight"][2] == (768, cfg.dim)  # ne order: padded FFN is ne[0]
    assert tensors["blk.0.ffn_gate.weight"][2] == (cfg.dim, 768)


def test_tokenizer_parity_and_control_markers(exported, tokenizer):
    llm = llama_cpp.Llama(str(exported("f32")), n_ctx=256, verbose=False)
    try:
        for text in FRENCH_TEXTS + TRICKY_TEXTS + ["\n\nlignes vides\n", " 1 2  3   4"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.encode(text, bos=True), text
            assert llm.detokenize(tokenizer.encode(text)).decode() == text
        assert llm.tokenize(CHAT.encode(), add_bos=True, special=True) == tokenizer.encode(CHAT, bos=True)
        for marker in (IM_START, IM_END):
            assert llm.tokenize(marker.encode(), add_bos=False, special=True) == [tokenizer.piece_to_id(marker)]
            assert len(llm.tokenize(marker.encode(), add_bos=False, special=False)) > 1
        assert (llm.token_bos(), llm.token_eos()) == (tokenizer.bos_id, tokenizer.eos_id)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_vocab_is_eog(vocab, tokenizer.piece_to_id(IM_END))
        assert llm.chat_format == "chatml"
        assert llm.metadata["tokenizer.chat_template"] == jinja_template()
    finally:
        llm.close()


def test_base_model_has_no_chat_template(model_dir, tmp_path):
    out = export_gguf(model_dir, tmp_path / "base.gguf", quant="f16", progress=False)
    assert "tokenizer.chat_template" not in fields(out)
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    try:
        assert llm.chat_format != "chatml" and llm.n_vocab() == 512
    finally:
        llm.close()


@pytest.mark.parametrize("quant,ftype", [("q4_k_m", 15), ("q6_k", 18)])
def test_types_and_bytes_match_llama_quantize(quant, ftype, exported, trained, tmp_path):
    """Unpadded, our one-pass file equals llama.cpp's quantizer run on our f32 file."""
    ours = read_gguf_tensors(exported(quant, False))
    ref_path = tmp_path / "ref.gguf"
    llama_cpp_quantize(exported("f32", False), ref_path, ftype)
    ref = read_gguf_tensors(ref_path)
    assert sorted(ours) == sorted(ref)
    assert {n: t for n, (t, _, _) in ours.items()} == {n: t for n, (t, _, _) in ref.items()}
    cfg = load_state_dict(trained)[1].cfg
    shapes = {n: tuple(reversed(s)) for n, (_, _, s) in ref.items()}
    assert {n: t for n, (t, _, _) in ref.items()} == tensor_types(shapes, quant, n_layers=cfg.n_layers)
    assert ref["blk.0.ffn_down.weight"][0] == QT.F16  # 683 columns: llama.cpp's F16 fallback
    same = total = 0
    for name, (qtype, data, _) in ours.items():
        if qtype in (QT.Q4_K, QT.Q6_K):
            block = gguf.GGML_QUANT_SIZES[qtype][1]
            a, b = data.reshape(-1, block), ref[name][1].reshape(-1, block)
            same += int((a == b).all(axis=1).sum())
            total += len(a)
    assert total > 0 and same / total >= 0.99, f"{same}/{total} identical blocks"


def test_ffn_padding(exported, trained, tokenizer):
    padded, plain = read_gguf_tensors(exported("q4_k_m")), read_gguf_tensors(exported("q4_k_m", False))
    downs = [t for n, (t, _, _) in padded.items() if "ffn_down" in n]
    assert set(downs) <= {QT.Q4_K, QT.Q6_K} and QT.Q6_K in downs
    size = lambda ts: sum(d.nbytes for _, d, _ in ts.values())  # noqa: E731
    assert size(padded) < size(plain)
    # Zero padding leaves the function unchanged: padded and unpadded f32 files give the same logits.
    ids = tokenizer.encode(FRENCH_TEXTS[0] + FRENCH_TEXTS[5], bos=True)
    runs = [GGUFRunner(exported("f32", pad), n_ctx=128) for pad in (True, False)]
    try:
        a, b = (r.logits(ids) for r in runs)
    finally:
        for r in runs:
            r.close()
    assert fields(exported("f32", True))["llama.feed_forward_length"][1] == 768
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_reads_hf_dir_and_pt_checkpoint(trained, exported, tmp_path):
    want = read_gguf_tensors(exported("q8_0"))
    hf = export_hf(trained, tmp_path / "hf", dtype="float32")
    sd, _ = load_state_dict(trained)
    sd["lm_head.weight"] = sd["tok_emb.weight"]
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "cfg": {"n_heads": 4, "n_kv_heads": 2},
                "step": 10}, tmp_path / "ckpt.pt")
    shutil.copy(trained / "tokenizer.model", tmp_path / "tokenizer.model")
    for src in (hf, tmp_path / "ckpt.pt"):
        got = read_gguf_tensors(export_gguf(src, tmp_path / f"{src.name}.gguf", quant="q8_0", chat=True,
                                            progress=False))
        assert list(got) == list(want)
        for name in want:
            assert got[name][0] == want[name][0] and np.array_equal(got[name][1], want[name][1]), name


def _leftovers(d):
    return [p.name for p in d.iterdir() if ".tmp" in p.name]


def test_truncated_input_fails_without_output(trained, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out = tmp_path / "out.gguf"
    assert main(["--model", str(bad), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and str(w) in err
    assert not out.exists() and not _leftovers(tmp_path)


def test_mismatched_config_fails(trained, tmp_path):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    meta = json.loads((bad / "model_config.json").read_text())
    meta["model"]["ffn_dim"] = 688
    (bad / "model_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ffn\.w1\.weight has shape \(683, 256\).*\(688, 256\)"):
        export_gguf(bad, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists() and not _leftovers(tmp_path)


def test_failure_mid_write_keeps_previous_file(trained, tmp_path):
    """A tensor that cannot be quantized (NaN) aborts after the header was written: the old file stays."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(trained, bad)
    sd = load_file(bad / "model.safetensors")
    sd["blocks.3.ffn.w2.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")
    with pytest.raises(ValueError, match="NaN"):
        export_gguf(bad, out, quant="q4_k_m", progress=False)
    assert out.read_bytes() == b"previous export" and not _leftovers(tmp_path)


def test_cli_default_name_and_modelfile(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(trained), "--quant", "q8_0", "--modelfile", "--no-progress"]) == 0
    assert (tmp_path / "rodin-test-Q8_0.gguf").is_file()
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./rodin-test-Q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text


def test_reads_training_checkpoint(trained, exported, tmp_path):
    """A DCP checkpoint as training.checkpointing writes it (checkpoint.json marker + shards)."""
    import json

    import torch.distributed.checkpoint as dcp

    from rodin.checkpoint import load_model

    import tempfile

    model, info = load_model(trained)
    before = set(Path(tempfile.gettempdir()).glob("rodin-export-ckpt-*"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000040"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    shutil.copy(trained / "tokenizer.model", ckpt / "tokenizer.model")
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 40, "model_config": info.cfg.to_dict(),
                                                      "chat_template": info.chat_template}))
    got = read_gguf_tensors(export_gguf(tmp_path / "run", tmp_path / "ckpt.gguf", quant="q8_0", progress=False))
    want = read_gguf_tensors(exported("q8_0"))
    assert {n: t for n, (t, _, _) in got.items()} == {n: t for n, (t, _, _) in want.items()}
    assert all(np.array_equal(got[n][1], want[n][1]) for n in want)
    assert set(Path(tempfile.gettempdir()).glob("rodin-export-ckpt-*")) == before  # temporary dir removed


def _llama_cpp_tree():
    import glob
    import os

    for root in [os.environ.get("LLAMA_CPP_DIR", "")] + sorted(glob.glob("/tmp/lcp/llama_cpp_python-*/vendor/llama.cpp")):
        if root and (Path(root) / "convert_hf_to_gguf.py").is_file():
            return Path(root)
    return None


@pytest.mark.skipif(_llama_cpp_tree() is None, reason="llama.cpp's convert_hf_to_gguf.py not found: set LLAMA_CPP_DIR "
                    "to a llama.cpp tree (e.g. from `pip download --no-deps --no-binary :all: llama-cpp-python`)")
def test_f16_tensors_identical_to_convert_hf_to_gguf(trained, tmp_path):
    """llama.cpp's own converter on our HF export writes the same f16 tensors (Q/K permutation included)."""
    import subprocess
    import sys

    tree = _llama_cpp_tree()
    hf = export_hf(trained, tmp_path / "hf", dtype="bfloat16")
    ref = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16", "--outfile",
                    str(ref)], check=True, capture_output=True, env={**__import__("os").environ,
                                                                     "PYTHONPATH": str(tree / "gguf-py")})
    ours = read_gguf_tensors(export_gguf(hf, tmp_path / "ours.gguf", quant="f16", progress=False))
    theirs = read_gguf_tensors(ref)
    assert sorted(ours) == sorted(theirs)
    for name, (qtype, data, shape) in theirs.items():
        assert ours[name][0] == qtype and ours[name][2] == shape and np.array_equal(ours[name][1], data), name


def test_released_style_tokenizer_parity(text_marker_tokenizer, tmp_path):
    """Dummy prefix on and ChatML as plain text (like the released tokenizer): add_space_prefix is
    written true and llama.cpp still tokenizes exactly like SentencePiece."""
    from tests.fixtures import make_model_dir

    src = make_model_dir(tmp_path / "m", text_marker_tokenizer, chat=True)
    out = export_gguf(src, tmp_path / "m.gguf", quant="f16", progress=False)
    assert fields(out)["tokenizer.ggml.add_space_prefix"][1] is True
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    try:
        for text in FRENCH_TEXTS + TRICKY_TEXTS + [CHAT, "  deux espaces devant"]:
            want = text_marker_tokenizer.encode(text, bos=True)
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
        assert llm.chat_format == "chatml"
    finally:
        llm.close()
