"""Loglikelihood requests per second: our lm-eval model class against lm-eval's `hf` model.

Same weights (our model directory and its fp32 HF export through `export.hf`), the same
lm-eval requests (FrenchBench multiple-choice tasks, 3-shot, built once by lm-eval from the
task configs), same machine, same run. The two answers are compared too (max |Δ loglik|).

    python benchmarks/eval.py                                  # rodin-tiny shape, random weights, fixtures
    python benchmarks/eval.py --model runs/rodin-1b/final --data-dir data/french_bench --limit 50 --device cuda

Target: our class at least 2x lm-eval's `hf` model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.eval import build_tasks, set_offline  # noqa: E402
from apps.eval_data import DEFAULT_TEXT, make_fixtures  # noqa: E402

MC_TASKS = "vocab,grammar,reading_comp,boolqa,topic_based_nli,hellaswag,fquadv2_bool,xnli,arc_challenge"


def random_model_dir(out: Path, preset: str, seed: int = 0) -> Path:
    """A random-weight model of a preset's shape with a small French tokenizer."""
    from rodin.checkpoint import save_model
    from rodin.config import ModelConfig
    from rodin.model import Transformer
    from rodin.tokenizer import Tokenizer, train_tokenizer

    tok = Tokenizer(train_tokenizer([DEFAULT_TEXT] * 20, out / "tok", vocab_size=1000))
    cfg = dataclasses.replace(ModelConfig.from_name(preset), vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    return save_model(Transformer(cfg), out / "model", tokenizer=tok)


def build_requests(data_dir, tasks: str, num_fewshot: int, limit: int):
    from apps.eval_data import expand_tasks

    objs, missing = build_tasks(expand_tasks(tasks), data_dir, online=False, log_fn=lambda s: None)
    if missing:
        raise SystemExit("missing task data:\n" + "\n".join(f"  {t}: {m}" for t, m in missing.items()))
    reqs = []
    for task in objs.values():
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        reqs += [i for i in task.instances if i.request_type == "loglikelihood"]
    return reqs


def timed(lm, reqs, repeats: int) -> tuple[float, list]:
    lm.loglikelihood(reqs[:8], disable_tqdm=True)  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = lm.loglikelihood(reqs, disable_tqdm=True)
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python benchmarks/eval.py --preset rodin-tiny --limit 16 --batch-size 16")
    p.add_argument("--model", help="our model directory (default: random weights of --preset)")
    p.add_argument("--preset", default="rodin-tiny", help="shape of the random model (default rodin-tiny)")
    p.add_argument("--data-dir", help="FrenchBench data (default: fixtures written to a temp dir)")
    p.add_argument("--tasks", default=MC_TASKS, help="loglikelihood tasks (default: the model card's 9 MC tasks)")
    p.add_argument("--num-fewshot", type=int, default=3)
    p.add_argument("--limit", type=int, default=16, help="docs per task (default 16)")
    p.add_argument("--rows", type=int, default=24, help="fixture rows per split when no --data-dir (default 24)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both model classes (default 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both models (default: torch's). On a loaded machine use 1: "
                        "with more threads than free cores every small forward waits for a descheduled thread")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_offline()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="rodin-eval-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else random_model_dir(tmp, args.preset)
        data_dir = args.data_dir or make_fixtures(tmp / "data", rows=args.rows)
        reqs = build_requests(data_dir, args.tasks, args.num_fewshot, args.limit)
        from export.hf import export_hf
        from lm_eval.models.huggingface import HFLM

        from apps.eval_model import RodinLM

        hf_dir = export_hf(model_dir, tmp / "hf", dtype="float32")
        dtype = "float32"
        ours = RodinLM(str(model_dir), device=args.device, dtype=dtype, batch_size=args.batch_size)
        hf = HFLM(pretrained=str(hf_dir), dtype=dtype, device=args.device, batch_size=args.batch_size,
                  add_bos_token=True)
        n_tok = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in reqs)
        cfg = ours.model.cfg
        print(f"model: {model_dir} ({cfg.name}: dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
              f"ctx {cfg.context_length}), fp32, {args.device}, torch threads {torch.get_num_threads()}")
        print(f"requests: {len(reqs)} loglikelihood requests from {args.tasks} ({args.num_fewshot}-shot, "
              f"limit {args.limit}), {n_tok} tokens in total, batch size {args.batch_size}")
        t_hf, r_hf = timed(hf, reqs, args.repeats)
        t_ours, r_ours = timed(ours, reqs, args.repeats)
        ours.share_prefix = False
        t_plain, r_plain = timed(ours, reqs, 1)
        diff = max(abs(a[0] - b[0]) for a, b in zip(r_ours, r_hf))
        agree = sum(a[1] == b[1] for a, b in zip(r_ours, r_hf))
        print(f"{'lm-eval hf (HFLM)':34s} {t_hf:8.2f} s  {len(reqs) / t_hf:8.1f} req/s")
        print(f"{'rodin, no prefix sharing':34s} {t_plain:8.2f} s  {len(reqs) / t_plain:8.1f} req/s")
        print(f"{'rodin (RodinLM, shared prefixes)':34s} {t_ours:8.2f} s  {len(reqs) / t_ours:8.1f} req/s")
        print(f"max |loglik(rodin) - loglik(hf)| = {diff:.2e}; is_greedy agrees on {agree}/{len(reqs)}")
        print(f"speed-up vs lm-eval hf: {t_hf / t_ours:.2f}x (target >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
