import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rodin.checkpoint import to_hf_config, to_hf_name
from rodin.config import ModelConfig
from rodin.model import Transformer, chunked_cross_entropy

CFG = dataclasses.replace(ModelConfig.from_name("rodin-debug"), vocab_size=300)


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _hf_twin(model: Transformer) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(model.cfg, torch_dtype="float32"))).eval()
    sd = {to_hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA like rodin-1b, and GQA
def test_logits_equal_transformers_llama(n_kv_heads):
    model = _model(dataclasses.replace(CFG, n_kv_heads=n_kv_heads))
    hf = _hf_twin(model)
    idx = torch.randint(0, CFG.vocab_size, (2, 37))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    model = _model()
    idx = torch.randint(0, CFG.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(1, 64)
        steps = [model(idx[:, :25], input_pos=0)]  # prefill
        steps += [model(idx[:, t:t + 1], input_pos=t) for t in range(25, 32)]  # one-token decode
        steps += [model(idx[:, 32:], input_pos=32)]  # multi-token chunk at an offset
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_forward_refuses_to_run_past_the_context():
    model = _model()
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, CFG.context_length + 1, dtype=torch.long))


def test_chunked_cross_entropy_matches_reference_loss_and_gradients():
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    t[::7] = -100
    loss = chunked_cross_entropy(h, w, t, chunk_size=8)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_loss_with_targets_equals_cross_entropy_of_logits():
    model = _model()
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    with torch.no_grad():
        ref = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        assert torch.allclose(model(idx, idx, loss_chunk_size=7), ref, atol=1e-6)


def test_packed_documents_with_position_reset_and_mask_equal_separate_runs():
    model = _model()
    a, b = torch.randint(0, CFG.vocab_size, (1, 9)), torch.randint(0, CFG.vocab_size, (1, 6))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    doc = torch.tensor([0] * 9 + [1] * 6)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(15, 15, dtype=torch.bool).tril()
    with torch.no_grad():
        out = model(packed, positions=positions, attn_mask=mask[None, None])
        torch.testing.assert_close(out[:, :9], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 9:], model(b), rtol=1e-5, atol=1e-5)


def test_init_and_tying():
    model = _model(ModelConfig.from_name("rodin-debug"))
    assert model.lm_head.weight is model.tok_emb.weight
    std = model.blocks[0].ffn.w1.weight.std().item()
    assert 0.017 < std < 0.023
    assert torch.all(model.norm.weight == 1)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
