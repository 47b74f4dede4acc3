"""FrenchBench reports: Markdown tables, charts and side-by-side comparisons of lm-eval results.

Reads lm-eval's results JSON as lm-eval writes it (our `results.json`, or the `results_*.json`
of the `lm-eval` CLI) and writes:

    report.md          per task (metric, score, stderr), per model-card category, perplexity
    tasks.png          the headline metric of each task (model card value as a marker)
    categories.png     the category profile (linguistic competence, reasoning MCQ, generative QA)
    comparison.md/png  several runs side by side, optionally with the released RODIN-1B scores

    python -m apps.eval_report RUN_DIR [RUN_DIR ...] --out DIR [--labels A,B] [--reference]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "french_bench_"

# The metric the model card reports for each task, and the other tasks' headline metric.
HEADLINE = {
    "vocab": "acc", "grammar": "acc", "reading_comp": "acc", "boolqa": "acc",
    "topic_based_nli": "acc_norm", "hellaswag": "acc_norm", "fquadv2_bool": "acc", "xnli": "acc",
    "arc_challenge": "acc_norm", "trivia": "f1", "fquadv2_genq": "f1", "fquadv2": "f1",
    "fquadv2_hasAns": "f1", "multifquad": "f1", "orangesum_abstract": "rouge1", "orangesum_title": "rouge1",
    "opus_perplexity": "word_perplexity", "wikitext_fr": "word_perplexity",
}
# The model card's grouping (plain means of the tasks' headline metric).
CATEGORIES = {
    "linguistic competence": ["vocab", "grammar", "reading_comp", "boolqa"],
    "reasoning MCQ": ["topic_based_nli", "hellaswag", "fquadv2_bool", "xnli", "arc_challenge"],
    "generative QA": ["trivia", "fquadv2_genq", "fquadv2"],
}
# Released RODIN-1B base model, lm-eval french_bench 3-shot (model card).
REFERENCE_LABEL = "RODIN-1B (model card)"
REFERENCE_SCORES = {
    "vocab": 0.773, "grammar": 0.765, "reading_comp": 0.606, "boolqa": 0.573, "topic_based_nli": 0.498,
    "hellaswag": 0.424, "fquadv2_bool": 0.500, "xnli": 0.333, "arc_challenge": 0.265, "trivia": 0.245,
    "fquadv2_genq": 0.165, "fquadv2": 0.095,
}
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
CATEGORY_COLORS = {"linguistic competence": "#4C72B0", "reasoning MCQ": "#DD8452", "generative QA": "#55A868",
                   None: "#8C8C8C"}


def short(task: str) -> str:
    return task[len(PREFIX):] if task.startswith(PREFIX) else task


def category_of(task: str) -> str | None:
    return next((c for c, ts in CATEGORIES.items() if short(task) in ts), None)


@dataclass
class Run:
    """One evaluation: lm-eval's results plus what our CLI recorded next to them."""

    label: str
    results: dict
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def tasks(self) -> list[str]:
        groups = set(self.results.get("group_subtasks", {}))
        return sorted(t for t, r in self.results.get("results", {}).items()
                      if t not in groups and any("," in k for k in r))

    def metrics(self, task: str) -> list[tuple[str, float, float | None]]:
        """[(metric, value, stderr or None)] of a task, filter `none` (or the first one)."""
        r = self.results["results"][task]
        out = []
        for key, value in r.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            err = r.get(f"{metric}_stderr,{filt}")
            out.append((metric, float(value), float(err) if isinstance(err, (int, float)) else None))
        return out

    def score(self, task: str) -> tuple[str, float, float | None] | None:
        """(metric, value, stderr) of the task's headline metric, or None when absent."""
        name = task if task.startswith(PREFIX) else PREFIX + task
        if name not in self.results.get("results", {}):
            return None
        metrics = self.metrics(name)
        want = HEADLINE.get(short(name))
        for m in metrics:
            if m[0] == want:
                return m
        return metrics[0] if metrics else None

    def category_scores(self) -> dict[str, tuple[float, int, int]]:
        """{category: (plain mean, tasks present, tasks in category)} over the tasks present."""
        out = {}
        for cat, tasks in CATEGORIES.items():
            vals = [s[1] for t in tasks if (s := self.score(t)) is not None and not math.isnan(s[1])]
            if vals:
                out[cat] = (sum(vals) / len(vals), len(vals), len(tasks))
        return out


def reference_run() -> Run:
    results = {"results": {PREFIX + t: {"alias": PREFIX + t, f"{HEADLINE[t]},none": v}
                           for t, v in REFERENCE_SCORES.items()},
               "n-shot": {PREFIX + t: 3 for t in REFERENCE_SCORES}}
    return Run(REFERENCE_LABEL, results, {"reference": True})


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """A run directory written by `python -m apps.eval`, or any lm-eval results JSON file."""
    if str(path) in ("reference", "rodin-1b-card"):
        return reference_run()
    p = Path(path)
    meta: dict = {}
    if p.is_dir():
        if (p / "results.json").is_file():
            res_file = p / "results.json"
        else:  # an lm-eval --output_path directory
            found = sorted(p.rglob("results_*.json"))
            if not found:
                raise FileNotFoundError(f"{p}: no results.json (apps.eval run) nor results_*.json (lm-eval) inside")
            res_file = found[-1]
        if (p / "run.json").is_file():
            meta = json.loads((p / "run.json").read_text())
    elif p.is_file():
        res_file = p
    else:
        raise FileNotFoundError(f"no evaluation run at {p}")
    try:
        results = json.loads(res_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{res_file} is not valid JSON ({e})") from e
    if "results" not in results:
        raise ValueError(f"{res_file} has no 'results' key: not an lm-eval results file")
    label = label or meta.get("label") or results.get("model_name") or (p.name if p.is_dir() else p.stem)
    return Run(label, results, meta, p)


# ----------------------------------------------------------------------------- Markdown


def _fmt(v: float | None, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.2f}" if metric in LOWER_IS_BETTER and metric != "bits_per_byte" else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def category_table(runs: Sequence[Run]) -> str:
    rows = []
    for cat, tasks in CATEGORIES.items():
        row = [cat, ", ".join(tasks)]
        for run in runs:
            cs = run.category_scores().get(cat)
            row.append("—" if cs is None else f"{cs[0]:.3f}" + ("" if cs[1] == cs[2] else f" ({cs[1]}/{cs[2]} tasks)"))
        rows.append(row)
    return _table(["category", "tasks (plain mean)", *[r.label for r in runs]], rows)


def task_table(run: Run, reference: Run | None = None) -> str:
    rows = []
    for task in sorted(run.tasks(), key=lambda t: (list(CATEGORIES).index(category_of(t)) if category_of(t) else 9,
                                                   short(t))):
        head = run.score(task)
        n = run.results.get("n-samples", {}).get(task, {}).get("effective")
        for metric, value, err in run.metrics(task):
            is_head = head is not None and metric == head[0]
            ref = reference.score(task) if reference is not None and is_head else None
            rows.append([short(task), category_of(task) or "other", f"**{metric}**" if is_head else metric,
                         _fmt(value, metric), _fmt(err, metric), str(n if n is not None else "—"),
                         _fmt(ref[1]) if ref and ref[0] == metric else ""])
    header = ["task", "category", "metric", "score", "stderr", "n"]
    if reference is not None:
        header.append(reference.label)
    else:
        rows = [r[:-1] for r in rows]
    return _table(header, rows)


def comparison_table(runs: Sequence[Run]) -> str:
    tasks = sorted({t for r in runs for t in r.tasks()},
                   key=lambda t: (list(CATEGORIES).index(category_of(t)) if category_of(t) else 9, short(t)))
    rows = []
    for task in tasks:
        metric = HEADLINE.get(short(task)) or next((s[0] for r in runs if (s := r.score(task))), "")
        vals = []
        for r in runs:
            s = r.score(task)
            vals.append(s[1] if s is not None and s[0] == metric else None)
        row = [short(task), metric, *[_fmt(v, metric) for v in vals]]
        if len(runs) > 1:
            base = vals[0]
            row.append("" if base is None else " / ".join(
                "—" if v is None else f"{v - base:+.3f}" for v in vals[1:]))
        rows.append(row)
    header = ["task", "metric", *[r.label for r in runs]]
    if len(runs) > 1:
        header.append(f"Δ vs {runs[0].label}")
    return _table(header, rows)


def _run_summary(run: Run) -> list[str]:
    cfg, meta = run.results.get("config", {}), run.meta
    shots = run.results.get("n-shot", {})
    nshot = sorted({v for t, v in shots.items() if HEADLINE.get(short(t)) not in LOWER_IS_BETTER})
    lines = [f"- model: `{meta.get('model', cfg.get('model_args') or cfg.get('model'))}` "
             f"(backend {meta.get('backend', cfg.get('model'))}, device {meta.get('device', cfg.get('device'))}, "
             f"dtype {meta.get('dtype', '—')})",
             f"- lm-eval {run.results.get('lm_eval_version', '—')}, {', '.join(map(str, nshot)) or '—'}-shot, "
             f"limit {cfg.get('limit')}, data {meta.get('data_dir') or 'hub'}"]
    if meta.get("seconds") is not None:
        lines.append(f"- evaluated in {meta['seconds']:.1f} s on {meta.get('host', 'this machine')}")
    if cfg.get("limit") is not None:
        lines.append(f"- **--limit {cfg['limit']}**: scores on a subset, not comparable with the model card")
    return lines


def render_report(run: Run, out_dir: Path, charts: Sequence[str] = ()) -> str:
    ref = reference_run()
    parts = [f"# FrenchBench: {run.label}", "", *_run_summary(run), ""]
    if run.tasks():
        parts += ["## Categories (model card grouping)", "", category_table([run, ref]), "",
                  "## Tasks", "", "Headline metric in bold (the one the model card reports).", "",
                  task_table(run, ref), ""]
    missing = run.meta.get("missing") or {}
    if missing:
        parts += ["## Tasks not run (data missing)", ""]
        parts += [f"- **{short(t)}**: {reason}" for t, reason in sorted(missing.items())] + [""]
    ppl = run.meta.get("perplexity")
    if ppl:
        parts += ["## Perplexity on held-out text", "",
                  _table(["file", "docs", "tokens", "words", "bytes", "token ppl", "word ppl", "byte ppl", "bits/byte"],
                         [[f"`{ppl['file']}`", str(ppl["docs"]), str(ppl["tokens"]), str(ppl["words"]), str(ppl["bytes"]),
                           f"{ppl['token_perplexity']:.2f}", f"{ppl['word_perplexity']:.2f}",
                           f"{ppl['byte_perplexity']:.4f}", f"{ppl['bits_per_byte']:.4f}"]]), ""]
    for c in charts:
        parts += [f"![{Path(c).stem}]({Path(c).name})", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- charts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_tasks(runs: Sequence[Run]) -> list[str]:
    tasks = sorted({short(t) for r in runs for t in r.tasks() if HEADLINE.get(short(t)) not in LOWER_IS_BETTER},
                   key=lambda t: (list(CATEGORIES).index(category_of(t)) if category_of(t) else 9, t))
    return tasks


def chart_tasks(run: Run, path: Path, reference: Run | None = None) -> Path | None:
    """Horizontal bars: the headline metric per task, stderr whiskers, model card markers."""
    tasks = _bar_tasks([run])
    if not tasks:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(tasks) + 1.6))
    ys = list(range(len(tasks)))[::-1]
    for y, t in zip(ys, tasks):
        metric, v, err = run.score(t)
        ax.barh(y, v, xerr=err if err else None, color=CATEGORY_COLORS[category_of(t)], height=0.7,
                error_kw={"ecolor": "#555555", "elinewidth": 0.8, "capsize": 2, "alpha": 0.6})
        ax.text(0.005, y, f"{v:.3f}", va="center", fontsize=8, color="white" if v > 0.08 else "black")
        if reference is not None and (rs := reference.score(t)) is not None and rs[0] == metric:
            ax.plot(rs[1], y, marker="D", color="black", markersize=5, zorder=3)
    ax.set_yticks(ys, [f"{t} ({run.score(t)[0]})" for t in tasks], fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("score")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CATEGORY_COLORS.values()]
    labels = [c or "other" for c in CATEGORY_COLORS]
    if reference is not None:
        handles.append(plt.Line2D([], [], marker="D", color="black", linestyle=""))
        labels.append(reference.label)
    ax.legend(handles, labels, fontsize=7, loc="lower right")
    ax.set_title(f"FrenchBench per task: {run.label}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def chart_categories(runs: Sequence[Run], path: Path, title: str = "FrenchBench category profile") -> Path | None:
    """Grouped bars: each run's score per model-card category."""
    cats = [c for c in CATEGORIES if any(c in r.category_scores() for r in runs)]
    if not cats:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        cs = run.category_scores()
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(cats))]
        vals = [cs[c][0] if c in cs else 0.0 for c in cats]
        bars = ax.bar(xs, vals, width * 0.95, label=run.label,
                      color="#222222" if run.meta.get("reference") else None,
                      alpha=0.55 if run.meta.get("reference") else 1.0)
        for b, c, v in zip(bars, cats, vals):
            if c in cs:
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("mean headline score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def chart_comparison(runs: Sequence[Run], path: Path) -> Path | None:
    """Grouped horizontal bars: every run's headline score per task."""
    tasks = _bar_tasks(runs)
    if not tasks:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 0.2 * len(tasks) * max(2, len(runs)) + 1.6))
    height = 0.8 / len(runs)
    for k, run in enumerate(runs):
        ys, vals = [], []
        for i, t in enumerate(tasks):
            s = run.score(t)
            if s is not None and s[0] == HEADLINE.get(t, s[0]):
                ys.append(len(tasks) - 1 - i + ((len(runs) - 1) / 2 - k) * height)
                vals.append(s[1])
        ax.barh(ys, vals, height * 0.95, label=run.label,
                color="#222222" if run.meta.get("reference") else None, alpha=0.55 if run.meta.get("reference") else 1)
    ax.set_yticks(range(len(tasks))[::-1], [f"{t} ({HEADLINE.get(t, '')})" for t in tasks], fontsize=8)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("score")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("FrenchBench comparison", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(run: Run, out_dir: str | os.PathLike) -> dict[str, Path]:
    """report.md, tasks.png and categories.png for one run; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    ref = reference_run()
    if (p := chart_tasks(run, out / "tasks.png", ref)) is not None:
        files["tasks_chart"] = p
    if (p := chart_categories([run, ref], out / "categories.png")) is not None:
        files["categories_chart"] = p
    files["report"] = write_text(out / "report.md", render_report(run, out, [str(f) for k, f in files.items()]))
    return files


def write_comparison(runs: Sequence[Run], out_dir: str | os.PathLike, with_reference: bool = True) -> dict[str, Path]:
    """comparison.md, comparison.png and comparison_categories.png for several runs."""
    runs = list(runs) + ([reference_run()] if with_reference and not any(r.meta.get("reference") for r in runs) else [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if (p := chart_comparison(runs, out / "comparison.png")) is not None:
        files["comparison_chart"] = p
    if (p := chart_categories(runs, out / "comparison_categories.png", "FrenchBench category profiles")) is not None:
        files["comparison_categories_chart"] = p
    parts = ["# FrenchBench comparison", ""]
    for r in runs:
        if not r.meta.get("reference"):
            parts += [f"### {r.label}", *_run_summary(r), ""]
    parts += ["## Categories", "", category_table(runs), "", "## Tasks (headline metric)", "", comparison_table(runs), ""]
    parts += [f"![{f.stem}]({f.name})" for f in files.values()]
    files["comparison"] = write_text(out / "comparison.md", "\n".join(parts) + "\n")
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m apps.eval_report", description="Compare FrenchBench runs side by side (Markdown + PNG).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m apps.eval_report runs/eval/base runs/eval/instruct --labels base,instruct "
               "--out runs/eval/compare\n  (a run is an `apps.eval` output dir or an lm-eval results_*.json; "
               "`reference` is the released RODIN-1B)")
    p.add_argument("runs", nargs="+", help="run directories or lm-eval results JSON files")
    p.add_argument("--out", required=True, help="output directory for comparison.md and the charts")
    p.add_argument("--labels", help="comma-separated labels, one per run (default: from the runs)")
    p.add_argument("--no-reference", action="store_true", help="leave out the released RODIN-1B scores")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    if len(labels) != len(args.runs):
        p.error(f"{len(labels)} labels for {len(args.runs)} runs")
    try:
        runs = [load_run(r, lab) for r, lab in zip(args.runs, labels)]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = write_comparison(runs, args.out, with_reference=not args.no_reference)
    print("\n".join(f"wrote {f}" for f in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
