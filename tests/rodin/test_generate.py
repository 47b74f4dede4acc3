import logging

import pytest
import torch

from rodin.generate import SamplingConfig, generate, generate_token_ids, stream
from rodin.model import Transformer
from tests.fixtures import debug_config

MEMORIZED = "Déjà 🎉 ça marche à Noël ! Les élèves chantent « Joyeux Noël » 🦜 et ça suffit."


@pytest.fixture(scope="module")
def parrot(tokenizer):
    """A debug model that has memorised one sentence full of accents and byte-fallback emoji."""
    torch.manual_seed(0)
    model = Transformer(debug_config(tokenizer))
    ids = torch.tensor([tokenizer.encode(MEMORIZED, bos=True, eos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval()


def _prompt(tokenizer, n_chars=5):
    return tokenizer.encode(MEMORIZED[:n_chars], bos=True)


def test_greedy_reproduces_the_memorised_text_and_stops_at_eos(parrot, tokenizer):
    res = generate(parrot, tokenizer, _prompt(tokenizer), 200)
    assert MEMORIZED[:5] + res.text == MEMORIZED
    assert res.finish_reason == "eos" and res.token_ids[-1] != tokenizer.eos_id


def test_greedy_is_deterministic(parrot, tokenizer):
    a = generate(parrot, tokenizer, _prompt(tokenizer, 2), 30)
    b = generate(parrot, tokenizer, _prompt(tokenizer, 2), 30)
    assert a.token_ids == b.token_ids


def test_streaming_equals_non_streaming_with_multibyte_text(parrot, tokenizer):
    emoji_bytes = [tokenizer.piece_to_id("<0xF0>")]
    ts = stream(parrot, tokenizer, _prompt(tokenizer), 200)
    chunks = list(ts)
    assert "".join(chunks) == ts.result.text == generate(parrot, tokenizer, _prompt(tokenizer), 200).text
    assert emoji_bytes[0] in ts.result.token_ids  # the emoji really came through byte-fallback pieces
    assert all("\ufffd" not in c for c in chunks), "a chunk split a multi-byte character"
    assert len(chunks) > 5  # streamed, not one block at the end


def test_stop_strings_cut_the_text_and_never_leak(parrot, tokenizer):
    ts = stream(parrot, tokenizer, _prompt(tokenizer), 200, stop_strings=["Noël"])
    chunks = list(ts)
    assert ts.result.finish_reason == "stop"
    assert "".join(chunks) == ts.result.text == MEMORIZED[5:MEMORIZED.index("Noël")]


def test_max_new_tokens(parrot, tokenizer):
    res = generate(parrot, tokenizer, _prompt(tokenizer), 4)
    assert len(res.token_ids) == 4 and res.finish_reason == "length"
    assert MEMORIZED.startswith(MEMORIZED[:5] + res.text)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(parrot, tokenizer):
    s = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=7)
    a = generate(parrot, tokenizer, [tokenizer.bos_id], 40, sampling=s, stop_ids=[])
    b = generate(parrot, tokenizer, [tokenizer.bos_id], 40, sampling=s, stop_ids=[])
    c = generate(parrot, tokenizer, [tokenizer.bos_id], 40,
                 sampling=SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=8), stop_ids=[])
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_top_k_one_is_greedy(parrot, tokenizer):
    greedy = generate(parrot, tokenizer, _prompt(tokenizer), 20)
    topk1 = generate(parrot, tokenizer, _prompt(tokenizer), 20, sampling=SamplingConfig(temperature=1.0, top_k=1, seed=0))
    assert greedy.token_ids == topk1.token_ids


def test_context_window_is_never_exceeded(parrot, tokenizer, caplog):
    ctx = parrot.cfg.context_length
    long_prompt = (tokenizer.encode(MEMORIZED) * 50)[: ctx + 40]
    with caplog.at_level(logging.WARNING):
        res = generate(parrot, tokenizer, long_prompt, 500, stop_ids=[])
    assert res.truncated_prompt_tokens == ctx + 40 - (ctx - ctx // 2) and "dropped its first" in caplog.text
    assert res.prompt_tokens + len(res.token_ids) <= ctx and res.finish_reason == "context"
    # a prompt that fits is kept whole; generation stops when the window is full
    ids = list(generate_token_ids(parrot, long_prompt[: ctx - 3], 100))
    assert len(ids) == 3


def test_empty_prompt_is_refused(parrot, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(parrot, tokenizer, [], 5)


def test_close_stops_a_stream_and_keeps_what_was_produced(parrot, tokenizer):
    ts = stream(parrot, tokenizer, _prompt(tokenizer), 200)
    first = next(iter(ts))
    ts.close()
    assert ts.result.finish_reason == "stopped" and MEMORIZED[5:].startswith(first)
    assert len(ts.result.token_ids) == 0 or ts.result.token_ids[0] == tokenizer.encode(MEMORIZED, bos=True)[len(_prompt(tokenizer))]
