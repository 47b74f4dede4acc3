"""Where documents come from: local files and folders, and Hugging Face datasets (streaming).

Local sources read plain text, HTML, man pages (roff), JSONL/JSON-lines and Parquet with a
text field, optionally compressed (.gz, .zst, .xz, .bz2). Bad input (invalid UTF-8, binary
files, empty files, enormous lines, a missing text field) is counted per reason and skipped.

Hub sources are named recipes for the RODIN-1B corpus (`RECIPES`): the dataset id, config,
split and the field that holds the text. The hub cannot be reached everywhere, so every recipe
can be pointed at local files of the same schema (`data_files=`), which runs the very same
code path (`datasets.load_dataset(..., streaming=True)` through datatrove's reader).

Source syntax used by the command lines:

    --source NAME=PATH[,text_field=F][,glob=PATTERN][,format=F][,meta=a+b]
    --recipe NAME[,data_files=GLOB][,limit=N][,text_field=F]

    python -m training.data.sources --list
    python -m training.data.sources --source wiki=dump.jsonl.gz --head 3
"""

from __future__ import annotations

import argparse
import bz2
import fnmatch
import gzip
import io
import json
import lzma
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.huggingface import HuggingFaceDatasetReader
from datatrove.utils.logging import logger

# ---------------------------------------------------------------------------------------
# Recipes for the RODIN-1B sources (dataset ids and fields as published on the Hub).


@dataclass(frozen=True)
class HubRecipe:
    name: str
    dataset: str                      # load_dataset path (hub id, or a builder such as "text")
    text_field: str
    config: str | None = None
    split: str = "train"
    data_files: str | None = None     # for builder datasets ("text") or local overrides
    builder_kwargs: tuple = ()        # extra load_dataset kwargs, as (key, value) pairs
    meta_fields: tuple[str, ...] = ()
    ocr_field: str | None = None      # per-document OCR quality score published with the data
    note: str = ""


RECIPES: dict[str, HubRecipe] = {r.name: r for r in [
    HubRecipe("hplt", "HPLT/HPLT2.0_cleaned", "text", config="fra_Latn",
              note="HPLT v2.0 cleaned web crawl, French (fra_Latn), CC0"),
    HubRecipe("cc100", "text", "text", data_files="https://data.statmt.org/cc-100/fr.txt.xz",
              builder_kwargs=(("sample_by", "paragraph"),),
              note="CC-100 French (statmt): one paragraph per line, documents separated by blank lines; "
                   "the hub copy `statmt/cc100` is a loading script that current `datasets` refuses, so the "
                   "recipe streams the original .xz with the `text` builder"),
    HubRecipe("wikipedia", "wikimedia/wikipedia", "text", config="20231101.fr", meta_fields=("title", "url"),
              note="Wikipedia FR dump 2023-11-01 (fields id, url, title, text)"),
    HubRecipe("wikisource", "wikimedia/wikisource", "text", config="20231201.fr", meta_fields=("title",),
              note="Wikisource FR dump 2023-12-01 (fields id, url, title, text)"),
    HubRecipe("pleias_books", "PleIAs/French-PD-Books", "complete_text",
              meta_fields=("title", "author", "date", "ocr"), ocr_field="ocr",
              note="French public-domain books from Gallica (fields file_id, ocr, title, date, author, "
                   "page_count, word_count, character_count, complete_text); `ocr` is an OCR quality score"),
    HubRecipe("pleias_news", "PleIAs/French-PD-Newspapers", "complete_text",
              meta_fields=("title", "date", "ocr"), ocr_field="ocr",
              note="French public-domain newspapers from Gallica (same schema as the books)"),
    HubRecipe("legifrance", "Nicolas-BZRD/LEGI_opendata", "text",
              note="Légifrance LEGI consolidated legislation (DILA open data), ODC-BY"),
]}

# ---------------------------------------------------------------------------------------
# File formats


TEXT_EXT = {".txt", ".text", ".md", ".rst"}
HTML_EXT = {".html", ".htm", ".xhtml"}
JSONL_EXT = {".jsonl", ".ndjson", ".json"}
PARQUET_EXT = {".parquet"}
COMPRESSION_EXT = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".bz2": "bz2"}
_MAN_EXT = re.compile(r"\.[1-9][a-z]*$")
SKIP_EXT = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".css", ".js", ".pdf", ".ico", ".woff", ".ttf", ".map"}


def split_compression(path: str) -> tuple[str, str | None]:
    for ext, comp in COMPRESSION_EXT.items():
        if path.endswith(ext):
            return path[: -len(ext)], comp
    return path, None


def detect_format(path: str) -> str:
    """'html' | 'man' | 'text' | 'jsonl' | 'parquet' | 'skip' from the file name."""
    base, _ = split_compression(str(path))
    suffix = Path(base).suffix.lower()
    if suffix in HTML_EXT:
        return "html"
    if suffix in JSONL_EXT:
        return "jsonl"
    if suffix in PARQUET_EXT:
        return "parquet"
    if suffix in TEXT_EXT:
        return "text"
    if _MAN_EXT.search(base) and ("/man" in str(path) or suffix[1:2].isdigit()):
        return "man"
    if suffix in SKIP_EXT:
        return "skip"
    return "text"


def decompress(raw: bytes, compression: str | None) -> bytes:
    if compression == "gzip":
        return gzip.decompress(raw)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    if compression == "xz":
        return lzma.decompress(raw)
    if compression == "bz2":
        return bz2.decompress(raw)
    return raw


def read_bytes(path: str | Path) -> bytes:
    """All bytes of a local file, decompressed according to its extension."""
    return decompress(Path(path).read_bytes(), split_compression(str(path))[1])


_CHARSET = re.compile(rb"charset=[\"']?([A-Za-z0-9_-]+)")


def decode_text(raw: bytes, fmt: str) -> str | None:
    """Strict UTF-8; HTML may declare another charset. None when the bytes are not valid text."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if fmt == "html" and (m := _CHARSET.search(raw[:4096])):
        charset = m.group(1).decode("ascii").lower()
        if charset not in ("utf-8", "utf8"):
            try:
                return raw.decode(charset)
            except (LookupError, UnicodeDecodeError):
                return None
    return None


def _iter_lines(f, max_bytes: int):
    """Lines of a binary stream; a line longer than `max_bytes` is consumed and yielded as None."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while True:  # skip the rest of the enormous line without holding it in memory
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


# ---------------------------------------------------------------------------------------
# Source specs


@dataclass
class SourceSpec:
    """One named source of documents: local `path` (file or folder) or a hub `recipe`."""

    name: str
    path: str | None = None
    recipe: HubRecipe | None = None
    text_field: str = "text"
    id_field: str = "id"
    glob: str | None = None            # fnmatch pattern on the path relative to `path`
    format: str = "auto"               # auto | text | html | man | jsonl | parquet
    meta_fields: tuple[str, ...] = ()
    limit: int = -1                    # documents per task (hub) / total files (local: max_files)
    max_mb: float | None = None        # local: stop adding files after this many MB (sorted order)
    options: dict = field(default_factory=dict)

    def describe(self) -> dict:
        if self.recipe:
            return {"name": self.name, "kind": "hub", "dataset": self.recipe.dataset, "config": self.recipe.config,
                    "text_field": self.text_field, "data_files": self.recipe.data_files}
        return {"name": self.name, "kind": "local", "path": self.path, "glob": self.glob, "format": self.format}


def _parse_options(parts: list[str], what: str) -> dict:
    opts = {}
    for p in parts:
        if "=" not in p:
            raise ValueError(f"{what}: option {p!r} is not key=value")
        k, v = p.split("=", 1)
        opts[k.strip()] = v.strip()
    return opts


def parse_source(spec: str) -> SourceSpec:
    """'NAME=PATH[,text_field=F,glob=G,format=F,meta=a+b,max_mb=N,max_files=N]'"""
    if "=" not in spec:
        raise ValueError(f"--source {spec!r}: expected NAME=PATH (e.g. wiki=/data/wiki.jsonl.gz)")
    name, rest = spec.split("=", 1)
    parts = rest.split(",")
    opts = _parse_options(parts[1:], f"--source {spec!r}")
    s = SourceSpec(name=name.strip(), path=parts[0])
    s.text_field = opts.pop("text_field", s.text_field)
    s.id_field = opts.pop("id_field", s.id_field)
    s.glob = opts.pop("glob", None)
    s.format = opts.pop("format", "auto")
    s.meta_fields = tuple(m for m in opts.pop("meta", "").split("+") if m)
    s.max_mb = float(opts.pop("max_mb")) if "max_mb" in opts else None
    s.limit = int(opts.pop("max_files", -1))
    if opts:
        raise ValueError(f"--source {spec!r}: unknown options {sorted(opts)}")
    if not Path(s.path).exists() and "://" not in s.path:
        raise FileNotFoundError(f"--source {name}: {s.path} does not exist")
    return s


def parse_recipe(spec: str) -> SourceSpec:
    """'NAME[,data_files=GLOB,limit=N,text_field=F,name=ALIAS]' for a recipe in RECIPES."""
    parts = spec.split(",")
    key = parts[0].strip()
    if key not in RECIPES:
        raise ValueError(f"--recipe {key!r}: unknown recipe; choose from {', '.join(RECIPES)}")
    opts = _parse_options(parts[1:], f"--recipe {spec!r}")
    recipe = RECIPES[key]
    if "data_files" in opts:  # same schema, local files: load_dataset("parquet"/"json", data_files=...)
        files = opts.pop("data_files")
        builder = {"parquet": "parquet", "jsonl": "json", "text": "text"}.get(detect_format(files), "json")
        recipe = replace(recipe, dataset=builder, config=None, data_files=files,
                         builder_kwargs=recipe.builder_kwargs if builder == "text" else ())
    s = SourceSpec(name=opts.pop("name", key), recipe=recipe, text_field=opts.pop("text_field", recipe.text_field),
                   meta_fields=recipe.meta_fields, limit=int(opts.pop("limit", -1)))
    if opts:
        raise ValueError(f"--recipe {spec!r}: unknown options {sorted(opts)}")
    return s


# ---------------------------------------------------------------------------------------
# Readers (datatrove steps)


class LocalFilesReader(BaseDiskReader):
    """datatrove reader for a folder (or one file) of mixed text/HTML/man/JSONL/Parquet files.

    Files are listed once, sorted, and dealt round-robin to the tasks (file i -> task i % N),
    so every task reads a deterministic slice: what a resumed task re-reads is exactly what
    the interrupted one read.
    """

    name = "📂 local files"

    def __init__(self, spec: SourceSpec, max_line_bytes: int = 16 << 20, max_doc_bytes: int = 64 << 20):
        path = Path(spec.path) if "://" not in spec.path else None
        folder, glob = spec.path, spec.glob
        if path is not None and path.is_file():
            folder, glob = str(path.parent), path.name
        super().__init__(folder, text_key=spec.text_field, id_key=spec.id_field, recursive=True,
                         add_file_path=False)
        self.spec = spec
        self.glob = glob
        self.max_line_bytes = max_line_bytes
        self.max_doc_bytes = max_doc_bytes

    # -- file listing ------------------------------------------------------------------
    def list_source_files(self) -> list[str]:
        files = sorted(self.data_folder.list_files(recursive=True))
        if self.glob:
            files = [f for f in files if fnmatch.fnmatch(f, self.glob) or fnmatch.fnmatch(Path(f).name, self.glob)]
        fmt = self.spec.format
        files = [f for f in files if (fmt != "auto" or detect_format(f) != "skip")]
        if self.spec.limit > 0:
            files = files[: self.spec.limit]
        if self.spec.max_mb:
            budget, kept = self.spec.max_mb * 1e6, []
            for f in files:
                if budget <= 0:
                    break
                kept.append(f)
                budget -= self.data_folder.size(f)
            files = kept
        return files

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        files = self.list_source_files()
        if not files:
            logger.warning(f"source {self.spec.name}: no files in {self.spec.path} (glob={self.glob})")
        for doc in self.read_files_shard(files[rank::world_size]):
            yield doc

    # -- reading -----------------------------------------------------------------------
    def _skip(self, reason: str, filepath: str, detail: str = "") -> None:
        self.stat_update(f"skipped_{reason}")
        self.stat_update(f"read/{self.spec.name}/skipped_{reason}")
        logger.warning(f"source {self.spec.name}: skipped {filepath}{detail}: {reason.replace('_', ' ')}")

    def _doc(self, text: str, doc_id: str, fmt: str, raw_size: int, extra: dict | None = None) -> Document:
        self.stat_update(f"read/{self.spec.name}/docs")
        self.stat_update(f"read/{self.spec.name}/bytes", value=raw_size)
        meta = {"source": self.spec.name, "format": fmt}
        if extra:
            meta.update(extra)
        return Document(text=text, id=doc_id, metadata=meta)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        fmt = self.spec.format if self.spec.format != "auto" else detect_format(filepath)
        compression = split_compression(filepath)[1]
        doc_id = f"{self.spec.name}/{filepath}"
        try:
            if fmt == "parquet":
                yield from self._read_parquet(filepath, doc_id)
                return
            if fmt == "jsonl":
                yield from self._read_jsonl(filepath, doc_id, compression)
                return
            with self.data_folder.open(filepath, "rb") as f:
                raw = f.read(self.max_doc_bytes + 1)
            raw = decompress(raw, compression) if compression else raw
        except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
            self._skip("unreadable_file", filepath, f" ({type(e).__name__}: {e})")
            return
        if len(raw) > self.max_doc_bytes:
            self._skip("file_too_large", filepath, f" (> {self.max_doc_bytes} bytes)")
            return
        if not raw.strip():
            self._skip("empty_file", filepath)
            return
        if b"\x00" in raw[:8192]:
            self._skip("binary_file", filepath)
            return
        text = decode_text(raw, fmt)
        if text is None:
            self._skip("invalid_utf8", filepath)
            return
        yield self._doc(text, doc_id, fmt, len(raw))

    def _row_to_doc(self, row: dict, doc_id: str, filepath: str, where: str, raw_size: int) -> Document | None:
        text = row.get(self.text_key)
        if not isinstance(text, str):
            self.stat_update("skipped_missing_text_field")
            self.stat_update(f"read/{self.spec.name}/skipped_missing_text_field")
            if not self._empty_warning:
                self._empty_warning = True
                logger.warning(f"source {self.spec.name}: {filepath}{where} has no string field "
                               f"{self.text_key!r} (fields: {sorted(row)[:12]}); use text_field=... "
                               f"(further rows like this are counted, not logged)")
            return None
        if not text.strip():
            self.stat_update(f"read/{self.spec.name}/skipped_empty_text")
            return None
        rid = row.get(self.id_key)
        extra = {k: row[k] for k in self.spec.meta_fields if k in row and row[k] is not None}
        inner_fmt = row.get("format") if row.get("format") in ("html", "man", "text") else "text"
        return self._doc(text, f"{doc_id}#{rid if rid is not None else where.lstrip(':')}", inner_fmt, raw_size, extra)

    def _read_jsonl(self, filepath: str, doc_id: str, compression: str | None) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb", compression=compression) as f:
            for lineno, line in enumerate(_iter_lines(f, self.max_line_bytes), 1):
                if line is None:
                    self._skip("enormous_line", filepath, f":{lineno}")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    self._skip("invalid_utf8", filepath, f":{lineno}")
                    continue
                except json.JSONDecodeError as e:
                    self._skip("invalid_json", filepath, f":{lineno} ({e.msg})")
                    continue
                if not isinstance(row, dict):
                    self._skip("invalid_json", filepath, f":{lineno} (not an object)")
                    continue
                doc = self._row_to_doc(row, doc_id, filepath, f":{lineno}", len(line))
                if doc is not None:
                    yield doc

    def _read_parquet(self, filepath: str, doc_id: str) -> DocumentsPipeline:
        import pyarrow.parquet as pq

        with self.data_folder.open(filepath, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if self.text_key not in names:
                n = pf.metadata.num_rows
                self.stat_update("skipped_missing_text_field", value=n)
                self.stat_update(f"read/{self.spec.name}/skipped_missing_text_field", value=n)
                logger.error(f"source {self.spec.name}: {filepath} has no column {self.text_key!r} "
                             f"(columns: {names}); its {n} rows are skipped; use text_field=...")
                return
            cols = [c for c in {self.text_key, self.id_key, *self.spec.meta_fields} if c in names]
            row_no = 0
            for batch in pf.iter_batches(batch_size=1024, columns=cols):
                for row in batch.to_pylist():
                    row_no += 1
                    text = row.get(self.text_key)
                    size = len(text.encode("utf-8", "replace")) if isinstance(text, str) else 0
                    doc = self._row_to_doc(row, doc_id, filepath, f":{row_no}", size)
                    if doc is not None:
                        yield doc


def _hub_adapter(self, data: dict, path: str, id_in_file):
    """Adapter for HubReader rows: text from the recipe's field, selected metadata, source tag."""
    text = data.get(self.text_key)
    if not isinstance(text, str):
        self.stat_update("skipped_missing_text_field")
        self.stat_update(f"read/{self.spec.name}/skipped_missing_text_field")
        return {"text": ""}
    self.stat_update(f"read/{self.spec.name}/docs")
    self.stat_update(f"read/{self.spec.name}/bytes", value=len(text.encode("utf-8", "replace")))
    meta = {"source": self.spec.name, "format": "text"}
    meta.update({k: data[k] for k in self.spec.meta_fields if data.get(k) is not None})
    rid = data.get(self.id_key, id_in_file)
    return {"text": text, "id": f"{self.spec.name}/{rid}", "metadata": meta}


class HubReader(HuggingFaceDatasetReader):
    """datatrove's Hugging Face reader (streaming) with a recipe's fields and our source tags."""

    name = "🤗 hub source"

    def __init__(self, spec: SourceSpec):
        r = spec.recipe
        options = {"split": r.split, **dict(r.builder_kwargs)}
        if r.config:
            options["name"] = r.config
        if r.data_files:
            options["data_files"] = r.data_files
        super().__init__(r.dataset, dataset_options=options, streaming=True, limit=spec.limit,
                         text_key=spec.text_field, adapter=_hub_adapter)
        self.spec = spec


def make_reader(spec: SourceSpec):
    return HubReader(spec) if spec.recipe else LocalFilesReader(spec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="List the RODIN hub recipes, or print the first documents of a source.",
        epilog="examples:\n  python -m training.data.sources --list\n"
               "  python -m training.data.sources --source docs=/usr/share/doc/debian-handbook/html/fr-FR --head 2\n"
               "  python -m training.data.sources --recipe wikipedia,data_files=wiki-fr/*.parquet --head 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the hub recipes (dataset id, config, text field)")
    ap.add_argument("--source", help="a local source NAME=PATH[,options] (see module docstring)")
    ap.add_argument("--recipe", help="a hub recipe NAME[,data_files=...,limit=N]")
    ap.add_argument("--head", type=int, default=3, help="how many documents to print (default 3)")
    args = ap.parse_args(argv)
    if args.list or not (args.source or args.recipe):
        for r in RECIPES.values():
            print(f"{r.name:14s} {r.dataset:32s} config={r.config or '-':12s} text={r.text_field:14s} {r.note}")
        return
    spec = parse_source(args.source) if args.source else parse_recipe(args.recipe)
    reader = make_reader(spec)
    for i, doc in enumerate(reader.run(None, 0, 1)):
        if i >= args.head:
            break
        print(f"=== {doc.id} {doc.metadata}\n{doc.text[:1000]}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
