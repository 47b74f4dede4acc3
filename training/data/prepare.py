"""The whole French data pipeline in one command, resumable: relaunch the same command after
an interruption and finished work is kept, unfinished work is redone.

Stages (datatrove pipelines on a LocalPipelineExecutor: parallel tasks, per-task completion
markers; outputs written under temporary names and renamed when a task completes):

  1. clean      read sources -> HTML/man to text, Unicode repair, boilerplate/OCR cleanup
                -> French language filter -> quality rules -> exact-hash record -> clean/NNNNN.jsonl.gz
  2. exact      find exact duplicates across all sources (one task)
  3. minhash    signatures -> LSH buckets -> clusters (datatrove MinHash)
  4. dedup      drop exact + near duplicates -> corpus/NNNNN.jsonl.gz (the cleaned corpus)
  5. tokenizer  train on a stratified sample + fertility report (skipped with --tokenizer)
  6. tokenize   per-source token shards -> tokens/
  7. blend      per-source budgets -> train.bin, val.bin (+ .idx.npy, meta.json)

Then stats.json / stats.md (docs and bytes per stage and source, rejection reasons, tokens).

    python -m training.data.prepare --out data/fr --source docs=/data/fr-docs \\
        --recipe wikipedia --recipe hplt,limit=100000 --vocab-size 64000 --budget hplt=1e9

On a cluster, the same steps run under datatrove's SlurmPipelineExecutor or RayPipelineExecutor
(see `build_pipelines` and docs/data.md).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
import multiprocess
import fsspec.compression
from loguru import _better_exceptions
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.logging import logger
from tqdm import tqdm

from training.data.blend import blend, parse_budgets
from training.data.clean import CleanConfig, CleanStep
from training.data.dedup import ExactDedupFilter, ExactFindDuplicates, ExactHashRecorder, FastMinhashSignature, \
    FrenchWordTokenizer, RankJsonlReader, minhash_config
from training.data.filters import FrenchLanguageFilter, QualityConfig, QualityFilter
from training.data.sources import SourceSpec, make_reader, parse_recipe, parse_source
from training.data.stats import CountStep, build_report, render_markdown, write_report
from training.data.tokenize import TokenShardWriter


# loguru builds an ExceptionFormatter for every `logger.add`, and each one lists the library
# folders of every sysconfig scheme (~4 ms); datatrove adds handlers for every task of every
# stage, which cost ~1 s per run of the benchmark. The folders do not change within a process.
_lib_dirs = functools.lru_cache(maxsize=1)(_better_exceptions.ExceptionFormatter._get_lib_dirs)
_better_exceptions.ExceptionFormatter._get_lib_dirs = staticmethod(lambda: list(_lib_dirs()))


def _register_gzip_level(level: int) -> str:
    """An fsspec compression name for gzip at `level` (fsspec's "gzip" always uses level 9,
    ~3x slower than level 1-6 on text for a few percent of size). Same gzip format."""
    name = f"gzip-{level}"
    if name not in fsspec.compression.compr:
        fsspec.compression.register_compression(
            name, lambda f, mode="rb", **kw: gzip.GzipFile(fileobj=f, mode=mode, compresslevel=level, **kw), [])
    return name


# work files (read once by the next stage): fastest level; the final corpus: zlib's default level
WORK_GZIP_LEVEL, CORPUS_GZIP_LEVEL = 1, 6


class AtomicJsonlWriter(JsonlWriter):
    """JsonlWriter that writes `tmp-NNNNN.jsonl.gz` and renames it to `NNNNN.jsonl.gz` only when
    the task's stream ended normally: a crashed task never leaves a file that looks complete."""

    name = "💾 jsonl (atomic)"

    def __init__(self, output_folder: str, compresslevel: int = 9):
        super().__init__(output_folder, output_filename="tmp-${rank}.jsonl.gz", compression="gzip")
        self.compresslevel = compresslevel
        self._rank = 0

    def run(self, data, rank: int = 0, world_size: int = 1):
        self._rank = rank
        final = Path(self.output_folder.path) / f"{rank:05d}.jsonl.gz"
        final.unlink(missing_ok=True)  # a rerun of this task replaces what an earlier attempt left
        if self.compresslevel != 9:
            self.output_mg.compression = _register_gzip_level(self.compresslevel)
        yield from super().run(data, rank, world_size)

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.close()
        tmp = Path(self.output_folder.path) / f"tmp-{self._rank:05d}.jsonl.gz"
        if exc_type is None and tmp.is_file():
            os.replace(tmp, tmp.with_name(f"{self._rank:05d}.jsonl.gz"))


class QuietLocalExecutor(LocalPipelineExecutor):
    """LocalPipelineExecutor whose tasks log to their log files only (errors still reach the console)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        try:
            return super()._run_for_rank(rank, local_rank + 1, node_rank)
        finally:  # datatrove re-adds a DEBUG console logger after each task
            logger.remove()
            logger.add(sys.stderr, level="WARNING")


@dataclass
class PrepareConfig:
    out: Path
    sources: list[SourceSpec]
    tasks: int = 8
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    vocab_size: int = 64000
    tokenizer: Path | None = None          # reuse an existing tokenizer instead of training one
    sample_mb: float = 1000.0              # tokenizer training sample
    quotas: dict = field(default_factory=dict)
    budgets: dict = field(default_factory=dict)
    val_fraction: float = 0.005
    allow_repeat: bool = True
    seed: int = 1234
    lang_threshold: float = 0.5
    quality: QualityConfig = field(default_factory=QualityConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    near_dedup: bool = True
    verbose: bool = False

    def fingerprint(self) -> dict:
        """What must not change between an interrupted run and its resumption."""
        return {"sources": [s.describe() for s in self.sources], "tasks": self.tasks,
                "quality": asdict(self.quality), "clean": asdict(self.clean), "lang_threshold": self.lang_threshold,
                "near_dedup": self.near_dedup, "vocab_size": self.vocab_size,
                "tokenizer": str(self.tokenizer) if self.tokenizer else None, "sample_mb": self.sample_mb,
                "quotas": self.quotas, "budgets": self.budgets, "val_fraction": self.val_fraction,
                "allow_repeat": self.allow_repeat, "seed": self.seed}


class Layout:
    """Where every stage writes inside the output directory."""

    def __init__(self, out: Path):
        self.out = out
        self.work = out / "work"
        self.clean = self.work / "clean"
        self.hashes = self.work / "exact_hashes"
        self.exact = self.work / "exact_remove"
        self.minhash = self.work / "minhash"
        self.corpus = out / "corpus"
        self.tokenizer_dir = out
        self.tokens = self.work / "tokens"
        self.logs = self.work / "logs"

    def log(self, stage: str) -> Path:
        return self.logs / stage


def _progress(desc: str, logging_dir: Path, total: int, stop: threading.Event) -> None:
    done_dir = logging_dir / "completions"
    with tqdm(total=total, desc=desc, unit="task") as bar:
        while not stop.is_set():
            n = len(list(done_dir.glob("*"))) if done_dir.is_dir() else 0
            bar.update(n - bar.n)
            stop.wait(0.3)
        n = len(list(done_dir.glob("*"))) if done_dir.is_dir() else 0
        bar.update(n - bar.n)


# Modules the forkserver imports once, so that each stage's worker processes start in ~0.1 s
# instead of re-importing datatrove, lingua, sentencepiece... (~2-3 s per stage on 2 cores).
_PRELOAD = ["training.data.prepare", "training.data.train_tokenizer", "lingua", "sentencepiece", "numpy"]


def _preload_forkserver() -> None:
    try:
        multiprocess.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    except ValueError:  # platform without forkserver
        pass


def run_stage(name: str, pipeline: list, tasks: int, workers: int, logging_dir: Path, verbose: bool = False) -> float:
    """Run one datatrove pipeline locally with a task progress bar; returns seconds spent."""
    t0 = time.time()
    if min(workers, tasks) > 1:
        _preload_forkserver()
    cls = LocalPipelineExecutor if verbose else QuietLocalExecutor
    executor = cls(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)), logging_dir=str(logging_dir))
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(name, logging_dir, tasks, stop), daemon=True)
    bar.start()
    try:
        executor.run()
    except Exception as e:
        raise RuntimeError(f"stage '{name}' failed ({type(e).__name__}: {e}); task logs: {logging_dir / 'logs'}. "
                           f"Fix the cause and rerun the same command: finished tasks are kept.") from e
    finally:
        stop.set()
        bar.join()
    incomplete = executor.get_incomplete_ranks()
    if incomplete:
        raise RuntimeError(f"stage '{name}': tasks {incomplete} did not complete; see {logging_dir / 'logs'}")
    return time.time() - t0


def clean_pipeline(cfg: PrepareConfig, lay: Layout) -> list:
    return [
        *[make_reader(s) for s in cfg.sources],
        CleanStep(cfg.clean),
        CountStep("clean"),
        FrenchLanguageFilter(cfg.lang_threshold),
        CountStep("language"),
        QualityFilter(cfg.quality),
        CountStep("quality"),
        ExactHashRecorder(str(lay.hashes)),
        AtomicJsonlWriter(str(lay.clean), WORK_GZIP_LEVEL),
    ]


def run_dedup(clean_dir: Path, hashes_dir: Path, work: Path, out_dir: Path, tasks: int, workers: int,
              near_dedup: bool = True, verbose: bool = False) -> dict[str, float]:
    """Stages 2-4: exact duplicates, MinHash near duplicates, filtered corpus."""
    timings = {}
    exact_dir, mh_dir, logs = work / "exact_remove", work / "minhash", work / "logs"
    timings["exact"] = run_stage("exact dedup", [ExactFindDuplicates(str(hashes_dir), str(exact_dir), tasks)], 1, 1,
                                 logs / "2_exact", verbose)
    mh = minhash_config()
    tok = FrenchWordTokenizer()
    if near_dedup:
        timings["minhash"] = run_stage("minhash signatures", [
            RankJsonlReader(str(clean_dir)), ExactDedupFilter(str(exact_dir)),
            FastMinhashSignature(str(mh_dir / "signatures"), config=mh, language=tok),
        ], tasks, workers, logs / "3_minhash_sigs", verbose)
        timings["minhash"] += run_stage("minhash buckets", [
            MinhashDedupBuckets(str(mh_dir / "signatures"), str(mh_dir / "buckets"), config=mh),
        ], mh.num_buckets, workers, logs / "3_minhash_buckets", verbose)
        timings["minhash"] += run_stage("minhash clusters", [
            MinhashDedupCluster(str(mh_dir / "buckets"), str(mh_dir / "remove"), config=mh),
        ], 1, 1, logs / "3_minhash_clusters", verbose)
    steps = [RankJsonlReader(str(clean_dir)), ExactDedupFilter(str(exact_dir)),
             CountStep("exact_dedup")]
    if near_dedup:
        steps.append(MinhashDedupFilter(str(mh_dir / "remove")))
    steps += [CountStep("near_dedup"), AtomicJsonlWriter(str(out_dir), CORPUS_GZIP_LEVEL)]
    timings["dedup"] = run_stage("dedup", steps, tasks, workers, logs / "4_dedup", verbose)
    return timings


def run_tokenize(corpus: Path, tokenizer: Path, out: Path, tasks: int | None, workers: int,
                 verbose: bool = False, logs: Path | None = None) -> float:
    tasks = tasks or max(1, len(list(Path(corpus).glob("[0-9]*.jsonl.gz"))))
    return run_stage("tokenize", [RankJsonlReader(str(corpus)), TokenShardWriter(str(tokenizer), str(out))],
                     tasks, workers, logs or (out.parent / "logs" / "6_tokenize"), verbose)


def prepare(cfg: PrepareConfig) -> dict:
    """Run (or resume) the whole pipeline; returns the stats report."""
    lay = Layout(Path(cfg.out))
    lay.work.mkdir(parents=True, exist_ok=True)
    if not cfg.verbose:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    fp_path = lay.work / "config.json"
    fp = json.loads(json.dumps(cfg.fingerprint(), default=str))
    if fp_path.is_file() and json.loads(fp_path.read_text()) != fp:
        raise SystemExit(f"{cfg.out} holds a run with a different configuration ({fp_path}); "
                         f"use another --out, or delete {lay.work} to start over")
    fp_path.write_text(json.dumps(fp, indent=2))
    timings: dict[str, float] = {}

    timings["clean"] = run_stage("clean+filter", clean_pipeline(cfg, lay), cfg.tasks, cfg.workers,
                                 lay.log("1_clean"), cfg.verbose)
    timings.update(run_dedup(lay.clean, lay.hashes, lay.work, lay.corpus, cfg.tasks, cfg.workers,
                             cfg.near_dedup, cfg.verbose))

    t0 = time.time()
    fertility = None
    if cfg.tokenizer:
        tok_path = Path(cfg.tokenizer)
        tok_path = tok_path / "tokenizer.model" if tok_path.is_dir() else tok_path
    else:
        tok_path = lay.tokenizer_dir / "tokenizer.model"
        fert_path = lay.tokenizer_dir / "fertility.json"
        if not (tok_path.is_file() and fert_path.is_file()):
            from training.data.train_tokenizer import train_on_corpus

            train_on_corpus(lay.corpus, lay.tokenizer_dir, cfg.vocab_size, cfg.sample_mb, cfg.quotas,
                            seed=cfg.seed, num_threads=cfg.workers)
        fertility = json.loads(fert_path.read_text())
    timings["tokenizer"] = time.time() - t0

    timings["tokenize"] = run_tokenize(lay.corpus, tok_path, lay.tokens, cfg.tasks, cfg.workers, cfg.verbose,
                                       lay.log("6_tokenize"))

    t0 = time.time()
    meta_path = lay.out / "meta.json"
    blend_fp = {"tokenizer": str(tok_path), "budgets": cfg.budgets, "val_fraction": cfg.val_fraction,
                "seed": cfg.seed}
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("blend_config") == blend_fp:
        meta = json.loads(meta_path.read_text())
    else:
        meta = blend(lay.tokens, lay.out, cfg.budgets, cfg.val_fraction, cfg.allow_repeat, cfg.seed,
                     sources_info=[s.describe() for s in cfg.sources])
        meta["blend_config"] = blend_fp
        tmp = lay.out / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        os.replace(tmp, meta_path)
    timings["blend"] = time.time() - t0

    from training.data.stats import merge_task_stats

    tok_stats = merge_task_stats(lay.log("6_tokenize"))
    per_source_tokens = {}
    for key, v in tok_stats.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "tokens":
            per_source_tokens.setdefault(parts[1], {"docs": 0, "tokens": 0})[parts[2]] += int(v)
    extra = {"tokens": {"per_source": per_source_tokens, "total": sum(d["tokens"] for d in per_source_tokens.values()),
                        "tokenizer": str(tok_path), "dtype": meta["dtype"]},
             "blend": {"splits": meta["splits"], "sources": meta["sources"]},
             "timings": {k: round(v, 2) for k, v in timings.items()}}
    if fertility:
        extra["fertility"] = fertility
    stage_logs = {name: lay.log(name) for name in ("1_clean", "4_dedup")}
    report = build_report(lay.out, stage_logs, extra)
    write_report(lay.out, report)
    return report


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared by prepare and demo_corpus."""
    ap.add_argument("--tasks", type=int, default=8, help="tasks per stage (files are dealt round-robin to tasks)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    ap.add_argument("--vocab-size", type=int, default=64000, help="tokenizer vocabulary size")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.model instead of training one")
    ap.add_argument("--sample-mb", type=float, default=1000.0, help="tokenizer training sample (MB of text)")
    ap.add_argument("--quota", action="append", default=[], help="SOURCE=WEIGHT tokenizer sampling weight")
    ap.add_argument("--budget", action="append", default=[],
                    help="SOURCE=TOKENS train-token budget of a source (default: everything once)")
    ap.add_argument("--val-fraction", type=float, default=0.005, help="share of each source's tokens for val.bin")
    ap.add_argument("--no-repeat", action="store_true", help="never repeat a source to meet its budget")
    ap.add_argument("--min-words", type=int, default=QualityConfig.min_words, help="quality rule: minimum words")
    ap.add_argument("--lang-threshold", type=float, default=0.5, help="minimum French confidence (lingua)")
    ap.add_argument("--no-near-dedup", action="store_true", help="exact dedup only (skip MinHash)")
    ap.add_argument("--seed", type=int, default=1234, help="sampling/shuffling seed")
    ap.add_argument("--verbose", action="store_true", help="show datatrove's per-task logs on the console")


def config_from_args(args, sources: list[SourceSpec], quality: QualityConfig | None = None) -> PrepareConfig:
    quality = quality or QualityConfig()
    quality.min_words = args.min_words
    return PrepareConfig(
        out=Path(args.out), sources=sources, tasks=args.tasks, workers=args.workers, vocab_size=args.vocab_size,
        tokenizer=args.tokenizer, sample_mb=args.sample_mb,
        quotas={k: float(v) for k, v in (q.split("=", 1) for q in args.quota)},
        budgets=parse_budgets(args.budget), val_fraction=args.val_fraction, allow_repeat=not args.no_repeat,
        seed=args.seed, lang_threshold=args.lang_threshold, quality=quality, near_dedup=not args.no_near_dedup,
        verbose=args.verbose)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Prepare French pretraining data: clean, filter, deduplicate, train a tokenizer, "
                    "tokenize and blend into train.bin/val.bin. Rerun the same command to resume.",
        epilog="examples:\n"
               "  python -m training.data.prepare --out data/mine --source docs=/data/fr-docs --vocab-size 8000\n"
               "  python -m training.data.prepare --out data/fr --recipe wikipedia --recipe hplt,limit=200000 \\\n"
               "      --budget hplt=1e9 --budget wikipedia=5e8\n"
               "  python -m training.data.prepare --out data/w --recipe wikipedia,data_files=wiki/*.parquet\n"
               "recipes: python -m training.data.sources --list",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (resumable)")
    ap.add_argument("--source", action="append", default=[],
                    help="local source NAME=PATH[,text_field=F,glob=G,format=F,meta=a+b,max_mb=N,max_files=N]")
    ap.add_argument("--recipe", action="append", default=[],
                    help="hub recipe NAME[,data_files=GLOB,limit=N,text_field=F] (see training.data.sources --list)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    try:
        sources = [parse_source(s) for s in args.source] + [parse_recipe(r) for r in args.recipe]
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if not sources:
        ap.error("give at least one --source or --recipe")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        ap.error(f"source names must be unique: {names}")
    try:
        report = prepare(config_from_args(args, sources))
    except RuntimeError as e:  # stage failures: the message says where the logs are and how to resume
        raise SystemExit(f"error: {e}") from None
    print(render_markdown(report))
    print(f"\ntrain/val: {Path(args.out) / 'train.bin'}, {Path(args.out) / 'val.bin'}; stats: {Path(args.out) / 'stats.md'}")


if __name__ == "__main__":
    main()
