"""export.verify: the report on real exports, and that it notices a broken one."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from export.gguf import export_gguf
from export.hf import export_hf
from export.verify import main, verify
from tests.helpers.tiny import EXPORT_TEST_SHAPE, cached_trained_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    return cached_trained_model(tmp_path_factory.getbasetemp(), tokenizer, chat=True, **EXPORT_TEST_SHAPE)


def test_hf_export_report(trained, tmp_path):
    out = export_hf(trained, tmp_path / "hf", dtype="float32")
    rep = verify(trained, out)
    assert rep.runtime == "transformers" and rep.tokenization_match
    assert rep.max_abs_logit_diff < 1e-4 and rep.top1_agreement == 1.0
    assert rep.perplexity_export == pytest.approx(rep.perplexity_source, rel=1e-5)


def test_detects_wrong_weights(trained, tmp_path):
    """An export of different weights (a layer scaled) must show up as disagreement."""
    out = export_hf(trained, tmp_path / "hf", dtype="float32")
    sd = load_file(out / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"] *= 3
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    rep = verify(trained, out)
    assert rep.max_abs_logit_diff > 0.5 and rep.top1_agreement < 0.95


def test_cli_json_and_thresholds(trained, tmp_path, capsys):
    g = export_gguf(trained, tmp_path / "m.gguf", quant="q4_k_m", progress=False)
    # A bound no export can meet: exit status 2, report still printed and written.
    assert main(["--model", str(trained), "--export", str(g), "--json", str(tmp_path / "r.json"),
                 "--min-top1", "1.01"]) == 2
    printed = capsys.readouterr().out
    assert "top-1 agree" in printed and "llama.cpp" in printed
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["runtime"] == "llama.cpp" and 0.9 <= rep["top1_agreement"] < 1.0 and rep["n_tokens"] > 100
    assert rep["tokenization_match"] and 0.95 < rep["perplexity_ratio"] < 1.05
    assert main(["--model", str(trained), "--export", str(tmp_path / "missing.gguf")]) == 1
