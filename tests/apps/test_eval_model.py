"""The `rodin` lm-eval model class against the plain computation (no benchmark data needed)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from lm_eval.api.instance import Instance

from apps.eval_model import PrefixScorer, RodinLM
from rodin.checkpoint import load_model
from rodin.generate import generate
from tests.fixtures import make_model_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine every small
    op would wait for a descheduled second thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, tokenizer):
    """rodin-debug with a 64-token window, so that truncation and rolling windows are exercised."""
    d = make_model_dir(tmp_path_factory.mktemp("eval_model") / "ctx64", tokenizer, seed=1, context_length=64)
    model, _ = load_model(d)
    return model


def plain_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unbatched forward of the whole (left-truncated) sequence, no cache."""
    full = (ctx + cont)[-(model.cfg.context_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor(full[:-1])[None])[0]
    lp = torch.log_softmax(logits.float(), -1)[-len(cont):]
    tgt = torch.tensor(full[-len(cont):])
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def few_shot_requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Requests shaped like a few-shot MC task: a shared few-shot prefix, per-question text,
    2-4 choices per question, some contexts longer than the window, an empty context (BOS)."""
    rng = random.Random(seed)
    shots = [2] + [rng.randrange(4, 500) for _ in range(30)]
    reqs = []
    for q in range(14):
        if q % 4 == 3:  # another task: no shared prefix, possibly longer than the window
            ctx = [2] + [rng.randrange(4, 500) for _ in range(rng.randrange(1, 90))]
        else:
            ctx = shots + [rng.randrange(4, 500) for _ in range(rng.randrange(0, 25))]
        for _ in range(rng.randrange(2, 5)):
            reqs.append((ctx, [rng.randrange(4, 500) for _ in range(rng.randrange(1, 9))]))
    reqs += [([2], [17, 18, 19]), reqs[5]]  # empty context (BOS only), a duplicate
    rng.shuffle(reqs)
    return reqs


@pytest.mark.parametrize("batch_size,max_batch_tokens", [(32, 8192), (3, 8192), (8, 70), (1, 1)])
def test_shared_prefix_matches_plain_computation(short_model, batch_size, max_batch_tokens):
    reqs = few_shot_requests()
    expected = [plain_loglikelihood(short_model, c, t) for c, t in reqs]
    for share in (True, False):
        got = PrefixScorer(short_model, batch_size=batch_size, max_batch_tokens=max_batch_tokens).score(
            reqs, share_prefix=share)
        for (ll, greedy), (ell, egreedy) in zip(got, expected):
            assert ll == pytest.approx(ell, abs=2e-4)
            assert greedy == egreedy


def test_shared_prefix_computes_each_prefix_once(short_model):
    """The point of sharing: the few-shot prefix goes through the model once, not per choice."""
    reqs = few_shot_requests()
    counted = {"tokens": 0}

    def count(module, args):
        counted["tokens"] += args[0].numel()

    handle = short_model.tok_emb.register_forward_pre_hook(count)
    try:
        PrefixScorer(short_model, batch_size=64).score(reqs, share_prefix=True)
        shared = counted["tokens"]
        counted["tokens"] = 0
        PrefixScorer(short_model, batch_size=64).score(reqs, share_prefix=False)
        plain = counted["tokens"]
    finally:
        handle.remove()
    real = sum(min(len(c) + len(t), 65) - 1 for c, t in reqs)
    assert shared < 0.6 * real <= plain


def test_batched_greedy_matches_rodin_generate(short_model, tokenizer):
    rng = random.Random(3)
    prompts = [[2] + [rng.randrange(4, 500) for _ in range(rng.randrange(0, 40))] for _ in range(5)]
    prompts.append(prompts[0][:5])  # shares a prefix with another prompt
    outs = PrefixScorer(short_model, batch_size=4).greedy(prompts, 12)
    for p, out in zip(prompts, outs):
        short_model.clear_kv_cache()
        ref = generate(short_model, tokenizer, p, 12, stop_ids=[])
        assert out == ref.token_ids


def _instances(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


def test_loglikelihood_through_lm_eval_interface(short_model, tokenizer):
    """lm-eval's (context, continuation) strings: BOS first, the context's trailing space moved
    into the continuation, an empty context scored after BOS."""
    lm = RodinLM(model=short_model, tokenizer=tokenizer, batch_size=4)
    args = [("Le petit chat", " dort sur le canapé."), ("Le petit chat", " mange."),
            ("Où est la bibliothèque ? ", "Elle est ici."), ("", "Bonjour à tous.")]
    got = lm.loglikelihood(_instances("loglikelihood", args), disable_tqdm=True)
    for (ctx, cont), (ll, _) in zip(args, got):
        stripped = ctx.rstrip()
        cont = ctx[len(stripped):] + cont
        ctx_ids = tokenizer.encode(stripped, bos=True)
        whole = tokenizer.encode(stripped + cont, bos=True)
        assert whole[:len(ctx_ids)] == ctx_ids
        assert ll == pytest.approx(plain_loglikelihood(short_model, ctx_ids, whole[len(ctx_ids):])[0], abs=2e-4)


def test_loglikelihood_rolling_sums_disjoint_windows(short_model, tokenizer):
    lm = RodinLM(model=short_model, tokenizer=tokenizer, batch_size=4)
    text = " ".join(["Les élèves étudient les mathématiques et l'histoire au collège."] * 6)
    ids = tokenizer.encode(text)
    assert len(ids) > 2 * 64  # three windows at least
    (got,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    # By hand: the first window is BOS + 63 tokens predicting 64; each later one predicts up to
    # 64 new tokens from the preceding 64 (context_len 1, max_seq_len 64).
    expected, done = 0.0, 0
    expected += plain_loglikelihood(short_model, [2], ids[:64])[0]
    done = 64
    while done < len(ids):
        n = min(64, len(ids) - done)
        expected += plain_loglikelihood(short_model, ids[max(0, done + n - 65):done], ids[done:done + n])[0]
        done += n
    assert got == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(got) and got < 0


def test_generate_until_stops_at_until_strings(short_model, tokenizer):
    lm = RodinLM(model=short_model, tokenizer=tokenizer, batch_size=2)
    prompts = ["Le petit chat dort", "Il était une fois", "Quelle heure est-il ?"]
    free = lm.generate_until(_instances("generate_until", [(p, {"until": [], "max_gen_toks": 16}) for p in prompts]),
                             disable_tqdm=True)
    for p, text in zip(prompts, free):
        expected = generate(short_model, tokenizer, tokenizer.encode(p, bos=True), 16).text
        assert text == expected
    stops = [t[len(t) // 2:len(t) // 2 + 2] or "x" for t in free]
    cut = lm.generate_until(_instances("generate_until", [(p, {"until": [s], "max_gen_toks": 16})
                                                          for p, s in zip(prompts, stops)]), disable_tqdm=True)
    for text, s, full in zip(cut, stops, free):
        assert text == full.split(s)[0]
        assert s not in text
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(_instances("generate_until", [("a", {"do_sample": True, "temperature": 0.7})]))


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("rodin") is RodinLM
