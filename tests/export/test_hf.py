"""export.hf: transformers loads the directory with no custom code and reproduces our model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from export.hf import export_hf, main
from rodin.chat import IM_END, IM_START, jinja_template, render
from rodin.checkpoint import load_model
from tests.fixtures import FRENCH_TEXTS, TRICKY_TEXTS, make_model_dir

CHAT_TEXT = f"{IM_START}system\nSois bref.{IM_END}\n{IM_START}user\nÇa va ?{IM_END}\n{IM_START}assistant\nOui !{IM_END}\n"
TEXTS = FRENCH_TEXTS + TRICKY_TEXTS + [CHAT_TEXT, "\n\nlignes vides\n", " 1 2  3   4"]


@pytest.fixture(scope="module")
def hf_fp32(chat_model_dir, tmp_path_factory):
    return export_hf(chat_model_dir, tmp_path_factory.mktemp("hf") / "fp32", dtype="float32")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0] if hasattr(model, "config") else model(torch.tensor([ids]))[0]


def test_transformers_logits_match_fp32(hf_fp32, chat_model_dir, tokenizer):
    ours, _ = load_model(chat_model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_fp32, dtype=torch.float32)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    for text in (FRENCH_TEXTS[0], FRENCH_TEXTS[4] + FRENCH_TEXTS[10], CHAT_TEXT):
        ids = tokenizer.encode(text, bos=True)
        a, b = _logits(ours, ids), _logits(theirs, ids)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_tokenizer_ids_equal_sentencepiece(hf_fp32, tokenizer):
    hf_tok = AutoTokenizer.from_pretrained(hf_fp32)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text, bos=True), text
        assert hf_tok.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    for marker in (IM_START, IM_END):
        assert hf_tok(marker, add_special_tokens=False)["input_ids"] == [tokenizer.piece_to_id(marker)]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id)


def test_chat_template_and_generation_config(hf_fp32, tokenizer):
    hf_tok = AutoTokenizer.from_pretrained(hf_fp32)
    msgs = [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": "Bonjour !"}]
    assert hf_tok.chat_template == jinja_template()
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == render(msgs, True)
    gen = json.loads((hf_fp32 / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokenizer.eos_id, tokenizer.piece_to_id(IM_END)]
    assert (gen["temperature"], gen["top_p"]) == (0.7, 0.9)
    card = (hf_fp32 / "README.md").read_text()
    assert card.startswith("---\nlanguage:\n- fr\nlicense: apache-2.0\n") and "pipeline_tag: text-generation" in card


def test_default_bf16_tied_and_base(model_dir, tokenizer, tmp_path):
    out = export_hf(model_dir, tmp_path / "bf16", base_model="rodin-llm/rodin-1b", datasets=["wikimedia/wikipedia"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys and len(keys) == 2 + 9 * 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    card = (out / "README.md").read_text()
    assert "base_model:\n- rodin-llm/rodin-1b" in card and "datasets:\n- wikimedia/wikipedia" in card
    # transformers re-ties lm_head to the bf16 embedding: same logits as our loader reading the export.
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    ours, info = load_model(out, dtype=torch.float32)  # the bf16 weights, upcast like transformers did
    assert info.source == "hf" and not info.is_chat
    ids = tokenizer.encode(FRENCH_TEXTS[2], bos=True)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)
    # bf16 rounding of the weights stays small against the fp32 source.
    src, _ = load_model(model_dir)
    assert (_logits(src, ids) - _logits(ours, ids)).abs().max() < 0.05


def test_untied_model_keeps_lm_head(tokenizer, tmp_path):
    src = make_model_dir(tmp_path / "untied", tokenizer, tie_embeddings=False)
    out = export_hf(src, tmp_path / "hf", dtype="float32")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in set(f.keys())
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, _ = load_model(src)
    ids = tokenizer.encode(FRENCH_TEXTS[3], bos=True)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_released_style_tokenizer(text_marker_tokenizer, tmp_path):
    """Dummy prefix on, ChatML markers as text (like the released RODIN tokenizer)."""
    src = make_model_dir(tmp_path / "m", text_marker_tokenizer)
    out = export_hf(src, tmp_path / "hf", dtype="float32")
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS + ["  deux espaces devant", "▁déjà un méta-espace"]:
        assert hf_tok(text)["input_ids"] == text_marker_tokenizer.encode(text, bos=True), text
    assert len(hf_tok(IM_START, add_special_tokens=False)["input_ids"]) > 1


def test_truncated_weights_fail_cleanly(model_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    out = tmp_path / "out"
    assert main(["--model", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and str(weights) in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_tokenizer_too_large_for_model(model_dir, tmp_path):
    from tests.fixtures import make_tokenizer

    big = make_tokenizer(tmp_path / "tok", vocab_size=600)
    with pytest.raises(ValueError, match="do not belong together"):
        export_hf(model_dir, tmp_path / "out", tokenizer=big.path)
    assert not (tmp_path / "out").exists()
