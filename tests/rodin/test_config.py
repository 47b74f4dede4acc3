import json

import pytest
import torch

from rodin.config import PRESETS, ModelConfig
from rodin.model import Transformer


def test_rodin_1b_is_exactly_the_released_shape():
    cfg = ModelConfig.from_name("rodin-1b")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (2048, 22, 16, 16, 5461)
    assert (cfg.vocab_size, cfg.context_length, cfg.rope_theta, cfg.norm_eps) == (64000, 2048, 10000.0, 1e-5)
    assert cfg.tie_embeddings and cfg.head_dim == 128
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 1_238_415_360


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_matches_the_module(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_presets_sizes():
    assert 400e6 < ModelConfig.from_name("rodin-410m").num_parameters() < 430e6
    assert 1e6 < ModelConfig.from_name("rodin-tiny").num_parameters() < 10e6
    assert ModelConfig.from_name("rodin-debug").n_kv_heads < ModelConfig.from_name("rodin-debug").n_heads


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.from_name("rodin-debug")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["ffn_dim"] == 172


def test_bad_configs_are_refused():
    with pytest.raises(KeyError, match="rodin-1b"):
        ModelConfig.from_name("rodin-7b")
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=16, n_kv_heads=5)
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({"dim": 64, "layers": 2})
