"""The built-in demo corpus: real French text with no hub access, from Debian's French
documentation, run through the same cleaning, filtering, dedup, tokenizer training,
tokenization and blend as any corpus (`training.data.prepare`), plus a small synthetic
ChatML instruction set for the SFT demo.

Sources (Debian packages; `apt-get install debian-handbook debian-reference-fr manpages-fr`):
  - debian-handbook      /usr/share/doc/debian-handbook/html/fr-FR/*.html  (Debian Administrator's Handbook)
  - debian-reference-fr  /usr/share/debian-reference/*.fr.html             (Debian Reference)
  - manpages-fr          /usr/share/man/fr/**/*.gz                          (French man pages, roff)

Output directory:
  corpus/NNNNN.jsonl.gz   cleaned, filtered, deduplicated documents ({"text", "id", "metadata"})
  tokenizer.model         SentencePiece BPE (default 8000 tokens, the rodin-tiny vocabulary)
  train.bin, val.bin      token streams (+ .idx.npy, meta.json) for `training.pretrain`
  sft.jsonl               SYNTHETIC instruction pairs {"messages": [...], "synthetic": true, ...}
  stats.json, stats.md    per-stage statistics;  README.md  what all this is

    python -m training.data.demo_corpus --out data/demo
    python -m training.data.demo_corpus --out /tmp/ci-demo --max-mb 0.5 --vocab-size 2000   # CI slice
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import re
import sys
from pathlib import Path

import xxhash

from training.data.clean import clean_text, html_to_text, roff_to_text
from training.data.filters import QualityConfig, french_score
from training.data.prepare import add_common_args, config_from_args, prepare
from training.data.sources import LocalFilesReader, SourceSpec
from training.data.stats import render_markdown

DEBIAN_SOURCES = {
    # name: (package, folder, glob)
    "debian_handbook": ("debian-handbook", "/usr/share/doc/debian-handbook/html/fr-FR", "*.html"),
    "debian_reference": ("debian-reference-fr", "/usr/share/debian-reference", "*.fr.html"),
    "manpages_fr": ("manpages-fr", "/usr/share/man/fr", "*.gz"),
}

SYSTEM_PROMPT = "Tu es un assistant qui répond en français, à partir de la documentation de Debian."
SECTION_QUESTIONS = [
    "Que dit {book} à propos de « {title} » ?",
    "Peux-tu m'expliquer « {title} » ?",
    "De quoi parle la section « {title} » {of_book} ?",
    "Résume ce que je dois savoir sur « {title} ».",
    "J'administre un système Debian. Que faut-il savoir sur « {title} » ?",
]
MAN_QUESTIONS = [
    "À quoi sert la commande « {name} » ?",
    "Que fait « {name} » ?",
    "Explique-moi la page de manuel de « {name} ».",
]
BOOKS = {"debian_handbook": ("le Cahier de l'administrateur Debian", "du Cahier de l'administrateur Debian"),
         "debian_reference": ("la Référence Debian", "de la Référence Debian")}


def debian_sources(root: str = "/", max_docs: int = -1, max_mb: float | None = None,
                   allow_missing: bool = False) -> list[SourceSpec]:
    """Source specs for the installed Debian French docs; a clear error names the packages to install."""
    specs, missing = [], []
    for name, (package, folder, glob) in DEBIAN_SOURCES.items():
        path = Path(root) / folder.lstrip("/")
        if not path.is_dir() or not any(path.rglob(glob)):
            missing.append(package)
            continue
        specs.append(SourceSpec(name=name, path=str(path), glob=glob, limit=max_docs, max_mb=max_mb))
    if missing and (not allow_missing or not specs):
        raise SystemExit(f"missing Debian documentation packages: {' '.join(missing)}\n"
                         f"install them with:  sudo apt-get install {' '.join(missing)}"
                         + ("\n(or pass --allow-missing to build from the installed ones)" if specs else ""))
    if missing:
        print(f"warning: building without {', '.join(missing)} (not installed)", file=sys.stderr)
    return specs


# ---------------------------------------------------------------------------------------
# Synthetic instruction pairs


def _strip_number(title: str) -> str:
    return re.sub(r"^\s*([A-Z]?[\d.]+|[IVX]+\.)\s*", "", title.replace("\xa0", " ")).strip()


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    out, size = [], 0
    for para in text.split("\n\n"):
        if out and size + len(para) > max_chars:
            break
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out)[: max_chars * 2]


def html_sections(raw: bytes) -> list[tuple[str, str, str]]:
    """(anchor, title, own text) of every DocBook section of a page, nested subsections excluded."""
    import lxml.html

    root = lxml.html.fromstring(raw)
    out = []
    for sec in root.xpath('//div[contains(concat(" ", @class, " "), " section ")]'):
        titles = sec.xpath('./div[@class="titlepage"]//*[contains(@class, "title")]')
        if not titles:
            continue
        title = _strip_number(titles[0].text_content())
        anchor = next(iter(sec.xpath('./div[@class="titlepage"]//a/@id')), "") or sec.get("id", "")
        body = copy.deepcopy(sec)
        for child in body.xpath('./div[@class="titlepage"] | .//div[contains(concat(" ", @class, " "), " section ")]'):
            child.getparent().remove(child)
        text = html_to_text(lxml.html.tostring(body, encoding="utf-8"))
        out.append((anchor, title, text))
    return out


def man_description(text: str) -> tuple[str, str] | None:
    """(command name, description) from the cleaned text of a French man page."""
    m = re.search(r"^NOM\s+(\S+?)(?:,.*?)?\s+[-–—]\s+(.+)$", text, re.M)
    if not m:
        return None
    name, summary = m.group(1).strip(), m.group(2).strip()
    desc = re.search(r"^DESCRIPTION\s*\n+(.+?)(?:\n\n[A-ZÉÈ][A-ZÉÈ \-]{3,}\s*(?:\n|$)|\Z)", text, re.M | re.S)
    body = desc.group(1).strip() if desc else ""
    answer = summary[0].upper() + summary[1:].rstrip(".") + "." + ("\n\n" + body if body else "")
    return name, answer


def _pick(templates: list[str], key: str) -> str:
    return templates[xxhash.xxh64_intdigest(key.encode()) % len(templates)]


def _ok(answer: str, min_chars: int) -> bool:
    return len(answer) >= min_chars and french_score(answer) >= 0.5


def build_sft(specs: list[SourceSpec], out_path: Path, max_answer_chars: int = 1800, min_answer_chars: int = 200,
              max_pairs: int | None = None) -> dict:
    """Heading -> section and command -> man-page description pairs, labelled synthetic."""
    records, seen = [], set()
    for spec in specs:
        # the same files as the corpus (glob, --max-docs, --max-mb applied by the reader's listing)
        files = [Path(spec.path) / f for f in LocalFilesReader(spec).list_source_files()]
        for path in files:
            rel = path.relative_to(spec.path)
            if spec.name in BOOKS:
                for anchor, title, text in html_sections(path.read_bytes()):
                    answer = _truncate(clean_text(text), max_answer_chars)
                    if not title or title.lower() in seen or not _ok(answer, min_answer_chars):
                        continue
                    seen.add(title.lower())
                    book, of_book = BOOKS[spec.name]
                    question = _pick(SECTION_QUESTIONS, title).format(title=title, book=book, of_book=of_book)
                    records.append((f"{spec.name}:{rel}#{anchor}", "heading-to-section", question, answer))
            elif spec.name == "manpages_fr":
                try:
                    text = clean_text(roff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8")))
                except (OSError, UnicodeDecodeError, EOFError):
                    continue
                got = man_description(text)
                if not got:
                    continue
                name, answer = got
                answer = _truncate(answer, max_answer_chars)
                if name.lower() in seen or not _ok(answer, min_answer_chars // 2):
                    continue
                seen.add(name.lower())
                question = _pick(MAN_QUESTIONS, name).format(name=name)
                records.append((f"{spec.name}:{rel}", "command-to-description", question, answer))
    if max_pairs:
        records = records[:max_pairs]
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for origin, kind, question, answer in records:
            f.write(json.dumps({
                "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                             {"role": "user", "content": question},
                             {"role": "assistant", "content": answer}],
                "synthetic": True, "generator": kind, "origin": origin,
            }, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r[1]] = kinds.get(r[1], 0) + 1
    return {"pairs": len(records), "by_generator": kinds, "file": str(out_path)}


README = """# RODIN demo corpus (built by `python -m training.data.demo_corpus`)

French text from Debian's documentation packages (debian-handbook, debian-reference-fr,
manpages-fr; free licences, see /usr/share/doc/<package>/copyright), cleaned, filtered,
deduplicated, tokenized and blended by `training.data.prepare`.

- `corpus/`: the cleaned documents; `tokenizer.model` + `fertility.json`: the tokenizer;
  `train.bin`/`val.bin` (+ `.idx.npy`, `meta.json`): token streams; `stats.md`: statistics.
- `sft.jsonl` is **SYNTHETIC**: its questions are generated from templates around the
  documentation's section headings and man-page names, and its answers are the documentation's
  own sections, copied verbatim (each record has `"synthetic": true` and its `origin`). It is a
  smoke test for the SFT pipeline, not a real instruction-tuning dataset.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Build the demo corpus (Debian French documentation -> cleaned corpus, tokenizer, "
                    "train.bin/val.bin) and a synthetic ChatML instruction set (sft.jsonl). Resumable.",
        epilog="examples:\n  python -m training.data.demo_corpus --out data/demo\n"
               "  python -m training.data.demo_corpus --out /tmp/demo-ci --max-mb 0.5 --vocab-size 2000\n"
               "needs: sudo apt-get install debian-handbook debian-reference-fr manpages-fr",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo", help="output directory (default data/demo)")
    ap.add_argument("--max-docs", type=int, default=-1, help="at most this many files per source (CI slices)")
    ap.add_argument("--max-mb", type=float, default=None,
                    help="at most this many MB of files (as stored, man pages compressed) per source")
    ap.add_argument("--allow-missing", action="store_true", help="build from whichever packages are installed")
    ap.add_argument("--root", default="/", help="filesystem root holding /usr/share (for tests and chroots)")
    add_common_args(ap)
    ap.set_defaults(vocab_size=8000, sample_mb=3.0, tasks=4, val_fraction=0.02)
    args = ap.parse_args(argv)
    specs = debian_sources(args.root, args.max_docs, args.max_mb, args.allow_missing)
    out = Path(args.out)
    try:
        report = prepare(config_from_args(args, specs, QualityConfig()))
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    sft = build_sft(specs, out / "sft.jsonl")
    report["sft"] = sft
    from training.data.stats import write_report

    write_report(out, report)
    (out / "README.md").write_text(README, encoding="utf-8")
    print(render_markdown(report))
    print(f"\nsft.jsonl: {sft['pairs']} synthetic pairs {sft['by_generator']}")
    print(f"demo corpus ready in {out}: tokenizer.model, train.bin, val.bin, sft.jsonl, stats.md")


if __name__ == "__main__":
    main()
