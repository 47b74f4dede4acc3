"""Per-run statistics: documents and bytes in/out per stage and source, rejection reasons,
token counts. Written by `prepare` as `stats.json` and `stats.md` in the run directory.

Counters come from the datatrove steps (`stat_update` keys of the form
`<stage>/<source>/<metric>`), merged from each task's own stats file, so a resumed run
reports the same figures as an uninterrupted one.

    python -m training.data.stats data/demo            # print the table of a finished run
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

# Stages in pipeline order. "read" counts raw input bytes (markup included).
STAGES = ("read", "clean", "language", "quality", "exact_dedup", "near_dedup")


class CountStep(PipelineStep):
    """Pass-through step counting documents and UTF-8 bytes per source after `stage`;
    also drops the pipeline-internal `_idx` metadata before documents are written."""

    name = "🔢 count"

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            src = doc.metadata.get("source", "?")
            self.stat_update(f"{self.stage}/{src}/docs")
            self.stat_update(f"{self.stage}/{src}/bytes", value=len(doc.text.encode("utf-8", "replace")))
            doc.metadata.pop("_idx", None)
            yield doc


def _value(v) -> float:
    if isinstance(v, dict):
        return v.get("total", 0)
    return v


def merge_task_stats(logging_dir: Path) -> dict[str, float]:
    """Sum every counter over the per-task stats files of one datatrove stage."""
    totals: dict[str, float] = defaultdict(float)
    for f in sorted((Path(logging_dir) / "stats").glob("*.json")):
        for step in json.loads(f.read_text()):
            for key, v in step.get("stats", {}).items():
                totals[key] += _value(v)
            totals[f"__time__/{step.get('name', '?')}"] += float(step.get("time_stats", 0) or 0) if not isinstance(
                step.get("time_stats"), dict) else step["time_stats"].get("total", 0)
    return dict(totals)


def build_report(run_dir: Path, stage_logs: dict[str, Path], extra: dict | None = None) -> dict:
    """Assemble the run report from the stages' logging folders (name -> folder)."""
    per_source: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    rejections: dict[str, float] = defaultdict(float)
    rejections_by_source: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    skipped_inputs: dict[str, float] = defaultdict(float)
    cleaning: dict[str, float] = defaultdict(float)
    for stage_name, folder in stage_logs.items():
        for key, v in merge_task_stats(folder).items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] in STAGES:
                stage, src, metric = parts
                if metric in ("docs", "bytes"):
                    per_source[src][stage][metric] = per_source[src][stage].get(metric, 0) + int(v)
                elif metric.startswith("skipped_"):
                    skipped_inputs[metric[8:]] += v
                    rejections_by_source[src][metric] += v
                elif metric.startswith("dropped_"):
                    rejections[f"{stage}:{metric[8:]}"] += v
                    rejections_by_source[src][f"{stage}:{metric[8:]}"] += v
            elif key in ("boilerplate_lines", "garbage_lines", "english_paragraphs", "mojibake_fixed_docs"):
                cleaning[key] += v
    # dedup drops are implied by the counts before/after
    for src, stages in per_source.items():
        for prev, stage in (("quality", "exact_dedup"), ("exact_dedup", "near_dedup")):
            if prev in stages and stage in stages:
                n = stages[prev].get("docs", 0) - stages[stage].get("docs", 0)
                if n:
                    rejections[f"{stage}:duplicate"] += n
                    rejections_by_source[src][f"{stage}:duplicate"] += n
    report = {
        "run_dir": str(run_dir),
        "stages": list(STAGES),
        "sources": {s: {st: dict(v) for st, v in d.items()} for s, d in sorted(per_source.items())},
        "totals": {st: {m: sum(per_source[s].get(st, {}).get(m, 0) for s in per_source) for m in ("docs", "bytes")}
                   for st in STAGES},
        "rejections": dict(sorted(rejections.items(), key=lambda kv: -kv[1])),
        "rejections_by_source": {s: dict(v) for s, v in sorted(rejections_by_source.items())},
        "skipped_inputs": dict(skipped_inputs),
        "cleaning": dict(cleaning),
    }
    if extra:
        report.update(extra)
    return report


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def render_markdown(report: dict) -> str:
    """A readable table of the report (also printed at the end of a run)."""
    lines = ["| source | " + " | ".join(report["stages"]) + " |", "|---" * (len(report["stages"]) + 1) + "|"]
    rows = list(report["sources"].items()) + [("**total**", report["totals"])]
    for src, stages in rows:
        cells = []
        for st in report["stages"]:
            d = stages.get(st, {})
            cells.append(f"{int(d.get('docs', 0)):,} docs / {_fmt_bytes(d.get('bytes', 0))}" if d else "-")
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    out = ["## Documents and bytes per stage", "", *lines, ""]
    if report.get("rejections"):
        out += ["## Rejections", "", "| stage:reason | documents |", "|---|---|"]
        out += [f"| {k} | {int(v):,} |" for k, v in report["rejections"].items()]
        out.append("")
    if report.get("skipped_inputs"):
        out += ["## Skipped inputs (bad files/rows)", "", "| reason | count |", "|---|---|"]
        out += [f"| {k} | {int(v):,} |" for k, v in report["skipped_inputs"].items()]
        out.append("")
    if report.get("cleaning"):
        out += ["## Cleaning", "", "| what | count |", "|---|---|"]
        out += [f"| {k} | {int(v):,} |" for k, v in report["cleaning"].items()]
        out.append("")
    if report.get("tokens"):
        t = report["tokens"]
        out += ["## Tokens", "", "| source | documents | tokens |", "|---|---|---|"]
        out += [f"| {s} | {int(d['docs']):,} | {int(d['tokens']):,} |" for s, d in t.get("per_source", {}).items()]
        out.append("")
    if report.get("blend"):
        b = report["blend"]
        out += ["## Blend", "", "| split | documents | tokens |", "|---|---|---|"]
        out += [f"| {name} | {int(d['docs']):,} | {int(d['tokens']):,} |" for name, d in b.get("splits", {}).items()]
        out.append("")
    if report.get("fertility"):
        f = report["fertility"].get("overall", {})
        out += ["## Tokenizer fertility (held-out text)", "",
                f"tokens/word {f.get('tokens_per_word', 0):.3f}, bytes/token {f.get('bytes_per_token', 0):.3f}, "
                f"byte-fallback rate {f.get('byte_fallback_rate', 0):.5f}", ""]
    if report.get("timings"):
        out += ["## Timings (seconds)", "", "| stage | s |", "|---|---|"]
        out += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
        out.append("")
    return "\n".join(out)


def write_report(run_dir: Path, report: dict) -> None:
    """stats.json + stats.md, each written atomically."""
    run_dir = Path(run_dir)
    for name, content in (("stats.json", json.dumps(report, indent=2, ensure_ascii=False)),
                          ("stats.md", render_markdown(report))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(run_dir / name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Print the statistics table of a finished data preparation run.",
                                 epilog="example: python -m training.data.stats data/demo",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="output directory of training.data.prepare or demo_corpus")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    args = ap.parse_args(argv)
    path = Path(args.run_dir) / "stats.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `python -m training.data.prepare --out {args.run_dir} ...` first")
    report = json.loads(path.read_text())
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render_markdown(report))


if __name__ == "__main__":
    main()
