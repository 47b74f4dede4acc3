"""FrenchBench evaluation of any RODIN model through lm-eval, with a readable report.

    python -m apps.eval --model runs/rodin-1b/final --tasks french_bench --num-fewshot 3
    python -m apps.eval --model runs/rodin-1b/final --data-dir data/french_bench --limit 50
    python -m apps.eval --model exports/rodin-1b-hf --backend hf          # lm-eval's own `hf` model
    python -m apps.eval --model runs/rodin-1b/final --perplexity heldout_fr.txt

Tasks come from the lm-eval install (`french_bench`, `french_bench_mc`, `_gen`, `_extra`,
`_perplexity`, or task names). Data is read from the hub when it is reachable, or from a local
directory with the hub's schema (`--data-dir`, layout in `apps.eval_data`); a task whose data
cannot be found is listed with the reason and the others run. ROUGE is computed locally.

Output directory (`--out`, default runs/eval/<model>-<backend>-<time>):
    results.json   lm-eval's results, as lm-eval returns them
    run.json       what was run: model, backend, data, missing tasks and why, timing, perplexity
    report.md      per-task and per-category tables; tasks.png, categories.png charts
    comparison.md  with --compare RUN ...: side by side with other runs and the released RODIN-1B
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

from apps.eval_report import Run, load_run, write_comparison, write_report, write_text

log = logging.getLogger("apps.eval")


def write_demo_fixtures(out_dir: str | os.PathLike, text: str | None = None, rows: int = 6) -> Path:
    """A small FrenchBench-format data directory (all 18 tasks) built from French `text`, for
    offline checks: `python -m apps.eval --model M --data-dir OUT --limit 4`."""
    from apps.eval_data import make_fixtures

    return make_fixtures(out_dir, text, rows=rows)


# ----------------------------------------------------------------------------- hub access


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host cannot be reached (a quick TCP probe,
    instead of the datasets library's 25 s of retries per task)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # the proxy decides; let the libraries try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def set_offline() -> None:
    """Make datasets / huggingface_hub read only local caches, failing fast."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE")):
        if mod in sys.modules:
            setattr(sys.modules[mod], attr, True)


# ----------------------------------------------------------------------------- tasks


def build_tasks(names: Iterable[str], data_dir: str | os.PathLike | None = None, online: bool = True,
                log_fn=print) -> tuple[dict, dict[str, str]]:
    """({task: lm-eval Task}, {task: why it cannot run}). Data is loaded here, task by task,
    so that one missing dataset is reported instead of stopping the evaluation."""
    from apps.eval_data import MissingTaskData, offline_task_config, task_config, task_manager

    tm = task_manager()
    tasks, missing = {}, {}
    for name in names:
        try:
            cfg = offline_task_config(name, data_dir)
            loaded = tm.load_task_or_group([cfg])
            tasks[name] = loaded[name]
            log_fn(f"  {name}: data loaded")
        except MissingTaskData as e:
            missing[name] = str(e)
        except Exception as e:  # datasets raises many types: hub, network, schema, loading scripts
            raw = task_config(name)
            ds = raw["dataset_path"] + (f" ({raw['dataset_name']})" if raw.get("dataset_name") else "")
            where = f"local files in {data_dir}" if data_dir else ("the hub" if online else "the hub (offline)")
            hint = ("check the files' columns against docs/eval.md" if data_dir else
                    "run with --data-dir DIR (fill it with `python -m apps.eval_data --download DIR` where the hub "
                    "is reachable)")
            if "Dataset scripts are no longer supported" in str(e):
                hint = ("this dataset needs a loading script, which datasets>=4 refuses; provide it as local "
                        "files with --data-dir")
            missing[name] = f"could not load {ds} from {where}: {type(e).__name__}: {str(e).splitlines()[0][:300]}; {hint}"
        if name in missing:
            log_fn(f"  {name}: MISSING: {missing[name]}")
    return tasks, missing


# ----------------------------------------------------------------------------- models


def export_for_hf(model: str, out_dir: Path, dtype: str = "float32") -> Path:
    """An HF directory for `model`: itself if it is one, else an `export.hf` export in out_dir."""
    p = Path(model)
    if (p / "config.json").is_file():
        return p
    from export.hf import export_hf

    return export_hf(model, out_dir, dtype=dtype)


def make_lm(model: str, backend: str = "rodin", device: str | None = None, dtype: str = "auto", batch_size=32,
            work_dir: Path | None = None, **kwargs):
    """The lm-eval model object for a backend: `rodin` (ours) or `hf` (lm-eval's HFLM on the HF export)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "rodin":
        from apps.eval_model import RodinLM

        return RodinLM(model, device=device, dtype=dtype, batch_size=batch_size, **kwargs)
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        hf_dtype = "float32" if dtype == "auto" and device == "cpu" else ("bfloat16" if dtype == "auto" else dtype)
        hf_dir = export_for_hf(model, Path(work_dir or tempfile.mkdtemp(prefix="rodin-hf-")) / "hf", hf_dtype)
        args = dict(pretrained=str(hf_dir), dtype=hf_dtype, device=device, batch_size=batch_size,
                    add_bos_token=kwargs.pop("add_bos_token", True))
        args.update(kwargs)
        return HFLM(**args)
    raise ValueError(f"unknown backend {backend!r}; choose rodin or hf")


# ----------------------------------------------------------------------------- perplexity


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a held-out text file: paragraphs separated by blank lines (or one per line
    for .jsonl files with a "text" field)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"perplexity text file not found: {p}")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    else:
        docs = [d.strip() for d in re.split(r"\n\s*\n", raw)]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{p} holds no text")
    return docs


def perplexity(lm, path: str | os.PathLike) -> dict:
    """Token, word and byte perplexity and bits per byte of a French text file (lm-eval's
    rolling loglikelihood: disjoint windows of the context length, the first after BOS)."""
    from lm_eval.api.instance import Instance

    docs = read_documents(path)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={"text": d}, arguments=(d,), idx=i)
            for i, d in enumerate(docs)]
    lls = lm.loglikelihood_rolling(reqs)
    total = sum(lls)
    tokens = sum(len(lm.tok_encode(d, add_special_tokens=False)) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"file": str(path), "docs": len(docs), "tokens": tokens, "words": words, "bytes": nbytes,
            "loglikelihood": total, "token_perplexity": math.exp(-total / tokens),
            "word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
            "bits_per_byte": -total / nbytes / math.log(2)}


# ----------------------------------------------------------------------------- the run


def _json_dump(obj) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(obj, indent=2, ensure_ascii=False, default=handle_non_serializable) + "\n"


def run_eval(model: str, tasks: str | list[str] | None = "french_bench", *, out_dir: str | os.PathLike,
             backend: str = "rodin", num_fewshot: int | None = 3, limit: float | None = None,
             data_dir: str | os.PathLike | None = None, device: str | None = None, dtype: str = "auto",
             batch_size=32, max_gen_toks: int | None = None, perplexity_file: str | None = None,
             label: str | None = None, log_samples: bool = False, bootstrap_iters: int = 1000, seed: int = 0,
             compare: list[str] | None = None, lm=None, model_kwargs: dict | None = None, log_fn=print) -> Run:
    """Evaluate, write results.json, run.json and the report to out_dir; returns the Run."""
    if lm is None:
        from rodin.checkpoint import resolve_model_path

        resolve_model_path(model)  # a wrong path fails now, not after the data is loaded
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    online = data_dir is None and hub_reachable()
    if not online:
        set_offline()
    from apps.eval_data import expand_tasks

    names = expand_tasks(tasks) if tasks else []
    meta = {"label": label or f"{Path(model).name} ({backend})", "model": str(model), "backend": backend,
            "device": device, "dtype": dtype, "data_dir": str(data_dir) if data_dir else None,
            "tasks_requested": tasks, "num_fewshot": num_fewshot, "limit": limit,
            "host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            "started": datetime.now().isoformat(timespec="seconds"), "missing": {}}
    task_objs, missing = {}, {}
    if names:
        log_fn(f"loading data of {len(names)} tasks from {data_dir or ('the hub' if online else 'the local cache (offline)')}")
        task_objs, missing = build_tasks(names, data_dir, online, log_fn)
        meta["missing"] = missing
    work = Path(tempfile.mkdtemp(prefix="rodin-eval-"))  # the HF export of --backend hf, removed at the end
    try:
        if lm is None:
            log_fn(f"loading {model} ({backend} backend)")
            lm = make_lm(model, backend, device=device, dtype=dtype, batch_size=batch_size, work_dir=work,
                         **(model_kwargs or {}))
        return _evaluate(lm, out, meta, task_objs, missing, num_fewshot=num_fewshot, limit=limit,
                         bootstrap_iters=bootstrap_iters, log_samples=log_samples, seed=seed, max_gen_toks=max_gen_toks,
                         perplexity_file=perplexity_file, compare=compare, t0=t0, log_fn=log_fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _evaluate(lm, out: Path, meta: dict, task_objs: dict, missing: dict, *, num_fewshot, limit,
              bootstrap_iters, log_samples, seed, max_gen_toks, perplexity_file, compare, t0, log_fn) -> Run:
    meta["device"] = str(getattr(lm, "device", meta.get("device")))
    try:
        meta["dtype"] = str(next(lm.model.parameters()).dtype).replace("torch.", "")
    except (AttributeError, StopIteration, TypeError):
        pass
    results: dict = {"results": {}}
    if task_objs:
        import lm_eval

        log_fn(f"evaluating {len(task_objs)} tasks ({num_fewshot}-shot{f', limit {limit}' if limit else ''})")
        t1 = time.time()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(task_objs.values()), num_fewshot=num_fewshot, limit=limit,
            bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None)
        meta["eval_seconds"] = time.time() - t1
        samples = results.pop("samples", None)
        write_text(out / "results.json", _json_dump(results))
        if samples:
            for task, rows in samples.items():
                write_text(out / f"samples_{task}.jsonl",
                           "".join(_json_dump(r).replace("\n", " ").strip() + "\n" for r in rows))
    if perplexity_file:
        log_fn(f"perplexity on {perplexity_file}")
        meta["perplexity"] = perplexity(lm, perplexity_file)
    meta["seconds"] = time.time() - t0
    write_text(out / "run.json", _json_dump(meta))
    if not task_objs:  # perplexity only: an empty lm-eval-shaped results file
        write_text(out / "results.json", _json_dump(results))
    run = Run(meta["label"], results, meta, out)
    files = write_report(run, out)
    if compare:
        others = [load_run(c) for c in compare]
        files.update(write_comparison([run, *others], out))
    if task_objs:
        from lm_eval.utils import make_table

        log_fn(make_table(results))
    if missing:
        log_fn(f"{len(missing)} task(s) not run, data missing:")
        for t, reason in missing.items():
            log_fn(f"  {t}: {reason}")
    if perplexity_file:
        p = meta["perplexity"]
        log_fn(f"perplexity: token {p['token_perplexity']:.2f}, word {p['word_perplexity']:.2f}, "
               f"bits/byte {p['bits_per_byte']:.4f} ({p['docs']} docs, {p['tokens']} tokens)")
    log_fn("wrote " + ", ".join(str(f) for f in [out / "results.json", out / "run.json", *files.values()]))
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m apps.eval", description="FrenchBench (lm-eval french_bench) evaluation with a report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m apps.eval --model runs/rodin-1b/final --tasks french_bench --num-fewshot 3\n"
               "  python -m apps.eval --model rodin-llm/rodin-1b --data-dir data/french_bench --device cuda\n"
               "  python -m apps.eval --model exports/rodin-1b-hf --backend hf --tasks french_bench_mc --limit 100\n"
               "  python -m apps.eval --model runs/rodin-tiny/final --perplexity heldout_fr.txt\n"
               "  python -m apps.eval --model M --data-dir runs/fb-fixtures --limit 4 --compare runs/eval/base\n"
               "offline fixtures: python -m apps.eval_data --make-fixtures runs/fb-fixtures")
    p.add_argument("--model", required=True, help="model dir (rodin or HF), upstream .pt, or hub id")
    p.add_argument("--backend", choices=["rodin", "hf"], default="rodin",
                   help="rodin: our model class (default); hf: lm-eval's `hf` model on the HF export (cross-check)")
    p.add_argument("--tasks", default=None,
                   help="tasks or tags, comma-separated: french_bench (default), french_bench_mc, french_bench_gen, "
                        "french_bench_extra, french_bench_perplexity, or task names (vocab, grammar, ...); "
                        "'none' with --perplexity for perplexity only")
    p.add_argument("--num-fewshot", type=int, default=3, help="few-shot examples (default 3, as the model card)")
    p.add_argument("--limit", type=float, default=None, help="first N docs per task (or a fraction < 1)")
    p.add_argument("--data-dir", help="local data directory with the hub's schema (see apps.eval_data); "
                                      "default: the hub")
    p.add_argument("--out", help="output directory (default runs/eval/<model>-<backend>-<time>)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16")
    p.add_argument("--batch-size", default="32", help="rows per forward pass (default 32)")
    p.add_argument("--max-gen-toks", type=int, help="cap on generated tokens per answer (default 256)")
    p.add_argument("--perplexity", metavar="FILE", help="also report perplexity on a held-out French text file "
                                                        "(paragraphs separated by blank lines)")
    p.add_argument("--label", help="name of this run in reports and comparisons")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="other run dirs / lm-eval results files to put side "
                                                               "by side ('reference' = released RODIN-1B)")
    p.add_argument("--log-samples", action="store_true", help="also write per-sample records samples_<task>.jsonl")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="bootstrap iterations for stderrs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (few-shot sampling of arc/hellaswag)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tasks = args.tasks
    if tasks is None:
        tasks = "french_bench"
    elif tasks.lower() == "none":
        tasks = None
    if tasks is None and not args.perplexity:
        p.error("nothing to do: give --tasks or --perplexity")
    out = args.out or Path("runs/eval") / f"{Path(args.model).name}-{args.backend}-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        run_eval(args.model, tasks, out_dir=out, backend=args.backend, num_fewshot=args.num_fewshot,
                 limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit, data_dir=args.data_dir,
                 device=args.device, dtype=args.dtype, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                 perplexity_file=args.perplexity, label=args.label, log_samples=args.log_samples,
                 bootstrap_iters=args.bootstrap_iters, seed=args.seed, compare=args.compare)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
