import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rodin.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, cpu_has_native_bf16, default_dtype, from_hf_config, load_model,
                              load_tokenizer, save_model, to_hf_config, to_hf_name)
from rodin.config import ModelConfig
from rodin.model import Transformer
from tests.fixtures import debug_config


@pytest.fixture(scope="module")
def reference(tokenizer):
    torch.manual_seed(1)
    return Transformer(debug_config(tokenizer)).eval()


@pytest.fixture(scope="module")
def idx(tokenizer):
    return torch.tensor([tokenizer.encode("Le chat dort sur le canapé à Paris.", bos=True)])


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)


def test_our_format_round_trip(tmp_path, reference, tokenizer, idx):
    out = save_model(reference, tmp_path / "m", tokenizer=tokenizer, chat_template="T", metadata={"step": 3})
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "tokenizer.model"])
    model, info = load_model(out)
    assert info.source == "rodin" and info.is_chat and info.metadata == {"step": 3}
    assert model.lm_head.weight is model.tok_emb.weight and model.tok_emb.weight.dtype == torch.float32
    assert torch.equal(_logits(model, idx), _logits(reference, idx))
    assert load_tokenizer(info).encode("Bonjour") == tokenizer.encode("Bonjour")
    # overwriting an existing directory is atomic and leaves no temporary directory behind
    save_model(reference, out, tokenizer=tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_hf_directory_and_upstream_pt_give_identical_logits(tmp_path, reference, tokenizer, idx):
    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(reference.cfg, torch_dtype="float32")))
    hf.load_state_dict({to_hf_name(k): v for k, v in reference.state_dict().items()}, strict=False)
    hf.tie_weights()
    hf.save_pretrained(tmp_path / "hf")
    tokenizer_bytes = tokenizer.path.read_bytes()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tokenizer_bytes)
    hf_model, info = load_model(tmp_path / "hf")
    assert info.source == "hf" and info.tokenizer_path is not None
    assert info.cfg == from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    torch.save({"model": reference.state_dict(), "cfg": {"n_heads": 4}, "step": 10}, tmp_path / "ckpt.pt")
    up_model, up_info = load_model(tmp_path / "ckpt.pt")
    assert up_info.source == "upstream" and up_info.cfg.n_kv_heads == reference.cfg.n_kv_heads
    ref = _logits(reference, idx)
    assert torch.equal(_logits(hf_model, idx), ref)
    assert torch.equal(_logits(up_model, idx), ref)


def test_upstream_bare_state_dict_with_compiled_prefix(tmp_path, reference, idx):
    # A bare state dict of a preset's shape: the head count comes from the preset.
    sd = {f"_orig_mod.{k}": v for k, v in reference.state_dict().items()}
    torch.save(sd, tmp_path / "bare.pt")
    model, info = load_model(tmp_path / "bare.pt")
    assert info.cfg.n_heads == reference.cfg.n_heads and info.cfg.name == "rodin-debug"
    assert torch.equal(_logits(model, idx), _logits(reference, idx))
    # A shape that matches no preset and no cfg: the head count cannot be guessed.
    odd = Transformer(dataclasses.replace(reference.cfg, ffn_dim=100))
    torch.save(odd.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="number of heads"):
        load_model(tmp_path / "odd.pt")
    assert load_model(tmp_path / "odd.pt", config=odd.cfg)[1].cfg.ffn_dim == 100


def test_runtime_dtype_never_changes_results_beyond_the_stored_precision(tmp_path, reference):
    assert default_dtype("cpu", torch.float32) == torch.float32 and default_dtype("cuda") == torch.bfloat16
    model, _ = load_model(save_model(reference, tmp_path / "fp32"))
    assert model.tok_emb.weight.dtype == torch.float32  # fp32 weights are never rounded
    model, _ = load_model(save_model(reference, tmp_path / "bf16", dtype=torch.bfloat16))
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert model.tok_emb.weight.dtype == expected == default_dtype("cpu", torch.bfloat16)
    assert torch.equal(model.tok_emb.weight.float(), reference.tok_emb.weight.to(torch.bfloat16).float())
    model32, _ = load_model(tmp_path / "bf16", dtype=torch.float32)
    assert model32.tok_emb.weight.dtype == torch.float32


def test_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path / "empty")


def test_missing_weights_file(tmp_path, reference):
    out = save_model(reference, tmp_path / "m")
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_model(out)


def test_truncated_safetensors(tmp_path, reference):
    out = save_model(reference, tmp_path / "m")
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(out)


def test_shapes_that_do_not_match_the_config(tmp_path, reference):
    out = save_model(reference, tmp_path / "m")
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["model"]["ffn_dim"] = 200
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"blocks.0.ffn.w1.weight has shape \(172, 64\) but the config"):
        load_model(out)


def test_truncated_upstream_pt(tmp_path, reference):
    torch.save(reference.state_dict(), tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "x.pt").write_bytes(data[:1000])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_model(tmp_path / "x.pt")


def test_unsupported_hf_configs_are_refused():
    base = to_hf_config(ModelConfig.from_name("rodin-debug"))
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="RoPE scaling"):
        from_hf_config({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
