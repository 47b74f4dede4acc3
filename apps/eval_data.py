"""FrenchBench task data: which tasks exist, where their data lives, local copies and fixtures.

The `french_bench` tasks are the ones lm-eval installs (`lm_eval/tasks/french_bench/*.yaml`);
nothing about them is re-declared here except the column schema used to write fixtures.
A local data directory mirrors the hub ids, one file per split:

    DATA_DIR/<dataset_path>[/<dataset_name>]/<split>.jsonl      (.json, .parquet or .csv also read)
    e.g. DATA_DIR/manu/french-bench-grammar-vocab-reading/Vocabulary.jsonl
         DATA_DIR/facebook/xnli/fr/test.jsonl
         DATA_DIR/orange_sum/abstract/validation.jsonl

    python -m apps.eval_data --make-fixtures DIR [--text FILE] [--rows 8]   # tiny offline data
    python -m apps.eval_data --download DIR [--tasks french_bench]           # hub -> DIR (online)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

TASK_PREFIX = "french_bench_"
TAGS = ("french_bench", "french_bench_mc", "french_bench_gen", "french_bench_extra", "french_bench_perplexity")
DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Tasks whose aggregation calls `evaluate.load("rouge")`, which needs the hub (see `rouge1_mean`).
_ROUGE_METRIC = "rouge1"


class MissingTaskData(RuntimeError):
    """The data of one task cannot be found or loaded; the message says where it was looked for."""


# ----------------------------------------------------------------------------- task registry


def french_bench_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "french_bench"


@functools.lru_cache(maxsize=1)
def task_manager():
    """An lm-eval TaskManager restricted to french_bench (8 ms instead of 6 s for the full index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=[str(french_bench_dir())])


def all_tasks() -> list[str]:
    index = task_manager().task_index
    return sorted(n for n, e in index.items() if n.startswith(TASK_PREFIX) and e.yaml_path is not None)


def expand_tasks(names: str | Iterable[str]) -> list[str]:
    """Task names from tags (`french_bench`, `french_bench_mc`, ...), full or short task names
    (`vocab` = `french_bench_vocab`), comma-separated or as a list; order kept, duplicates dropped."""
    if isinstance(names, str):
        names = [names]
    index = task_manager().task_index
    out: list[str] = []
    for raw in names:
        for name in (n.strip() for n in raw.split(",")):
            if not name:
                continue
            if name not in index and TASK_PREFIX + name in index:
                name = TASK_PREFIX + name
            entry = index.get(name)
            if entry is None:
                raise KeyError(f"unknown FrenchBench task or tag {name!r}; tags: {', '.join(TAGS)}; "
                               f"tasks: {', '.join(t[len(TASK_PREFIX):] for t in all_tasks())}")
            members = sorted(entry.tags) if entry.yaml_path is None else [name]
            out.extend(m for m in members if m not in out)
    return out


def task_config(name: str) -> dict:
    """The fully resolved task config (include and !function resolved) of an installed task."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index[name]
    return load_yaml(entry.yaml_path)


def task_splits(cfg: dict) -> list[str]:
    """Every split the task config names (all must exist, even at 0-shot: the sampler reads them)."""
    keys = ("training_split", "validation_split", "test_split", "fewshot_split")
    return sorted({cfg[k] for k in keys if cfg.get(k)})


def dataset_dir(data_dir: str | os.PathLike, cfg: dict) -> Path:
    d = Path(data_dir) / cfg["dataset_path"]
    return d / cfg["dataset_name"] if cfg.get("dataset_name") else d


def local_data_files(data_dir: str | os.PathLike, cfg: dict) -> tuple[str, dict[str, str]]:
    """(datasets builder, {split: absolute file}) of a task in a local data directory."""
    base = dataset_dir(data_dir, cfg).resolve()
    files: dict[str, Path] = {}
    missing = []
    for split in task_splits(cfg):
        found = [base / f"{split}{ext}" for ext in DATA_EXTENSIONS if (base / f"{split}{ext}").is_file()]
        if found:
            files[split] = found[0]
        else:
            missing.append(split)
    if missing:
        raise MissingTaskData(
            f"no local data for {cfg['task']}: missing split file(s) {', '.join(f'{s}.jsonl' for s in missing)} "
            f"in {base} (dataset {cfg['dataset_path']}{' / ' + cfg['dataset_name'] if cfg.get('dataset_name') else ''}). "
            f"Download it with `python -m apps.eval_data --download {data_dir} --tasks {cfg['task']}` "
            f"on a machine with internet, or write it with the schema in docs/eval.md")
    builders = {DATA_EXTENSIONS[p.suffix] for p in files.values()}
    if len(builders) > 1:
        raise MissingTaskData(f"{base}: the splits of {cfg['task']} mix file formats ({sorted(builders)}); "
                              f"use one format for all of them")
    return builders.pop(), {s: str(p) for s, p in files.items()}


def rouge1_mean(items: list) -> float:
    """ROUGE-1 F1 of (reference, prediction) pairs with `rouge_score` directly, no hub access.

    The installed `utils.rouge1_agg` calls `evaluate.load("rouge")`, which downloads a metric
    script from the hub. Same scorer and tokenizer as that script (rouge_score's default,
    no stemming); the reported value is the mean F1 over samples, where evaluate's
    BootstrapAggregator reports the median of 1000 resampled means (equal within noise).
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    if not items:
        return float("nan")
    scores = [scorer.score(str(ref), str(pred))["rouge1"].fmeasure for ref, pred in items]
    return sum(scores) / len(scores)


def offline_task_config(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """The config lm-eval gets for `name`: ROUGE aggregated locally and, with `data_dir`,
    the dataset read from local files instead of the hub."""
    cfg = task_config(name)
    metrics = []
    for m in cfg.get("metric_list", []):
        m = dict(m)
        if getattr(m.get("metric"), "__name__", m.get("metric")) == _ROUGE_METRIC and callable(m.get("aggregation")):
            m["aggregation"] = rouge1_mean
        metrics.append(m)
    cfg["metric_list"] = metrics
    if data_dir is not None:
        builder, files = local_data_files(data_dir, cfg)
        cfg.update(dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": files})
    return cfg


# ----------------------------------------------------------------------------- fixtures

DEFAULT_TEXT = """\
Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur Paris.
La bibliothèque municipale se trouve à côté de l'église, près de la rivière.
En 1789, la Révolution française a profondément changé la société et ses institutions.
Les élèves étudient les mathématiques, le français, l'histoire et la géographie au collège.
Le boulanger prépare chaque matin des baguettes croustillantes et des croissants dorés.
Il était une fois une princesse qui vivait dans un grand château au bord de la mer.
Debian est un système d'exploitation libre, développé par des milliers de bénévoles.
Pour installer un paquet, il faut utiliser la commande apt suivie du nom du paquet.
L'été dernier, nous sommes allés à la montagne où l'air était frais et pur.
Le train pour Marseille part de la gare de Lyon à quatorze heures trente.
Molière a écrit des comédies célèbres comme le Misanthrope, Tartuffe et l'Avare.
La Seine traverse Paris d'est en ouest avant de se jeter dans la Manche au Havre.
Les abeilles récoltent le nectar des fleurs pour fabriquer le miel de la ruche.
Le médecin conseille de boire beaucoup d'eau et de dormir au moins huit heures.
Victor Hugo a publié les Misérables en 1862 après un long exil à Guernesey.
Les vendanges commencent en septembre dans les vignobles de Bourgogne et du Bordelais.
Le musée du Louvre accueille chaque année des millions de visiteurs du monde entier.
La tour Eiffel a été construite pour l'Exposition universelle de 1889 à Paris.
Le fromage de Roquefort est affiné dans des caves naturelles au sud de la France.
Les enfants jouent au football dans la cour de l'école pendant la récréation.
Le Mont-Blanc est le plus haut sommet des Alpes avec plus de quatre mille mètres.
La cuisine française utilise souvent le beurre, la crème et les herbes fraîches.
Le conseil municipal a voté un nouveau budget pour rénover les routes du village.
Les marins bretons partaient autrefois pêcher la morue au large de Terre-Neuve.
"""

_WORD = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿŒœ'-]+")


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    out = [" ".join(p.split()) for p in parts]
    out = [s for s in out if len(_WORD.findall(s)) >= 6]
    return list(dict.fromkeys(out))


class _Fixture:
    """Deterministic FrenchBench-format rows built from French sentences."""

    def __init__(self, sentences: Sequence[str], seed: int):
        if len(sentences) < 4:
            raise ValueError("fixtures need at least 4 French sentences of 6+ words")
        self.sentences = list(sentences)
        self.rng = random.Random(seed)
        self.vocab = sorted({w for s in sentences for w in _WORD.findall(s) if len(w) > 3})

    def sentence(self, i: int) -> str:
        s = self.sentences[i % len(self.sentences)]
        k = i // len(self.sentences)
        return s if k == 0 else f"{s[:-1] if s.endswith('.') else s} (variante {k})."

    def passage(self, i: int, n: int = 3) -> str:
        return " ".join(self.sentence(i + j) for j in range(n))

    def blank(self, i: int) -> tuple[str, str, list[str]]:
        """(sentence with one word as <...>, the word, 3 distractors)."""
        s = self.sentence(i)
        words = [m for m in _WORD.finditer(s) if len(m.group()) > 3]
        m = words[self.rng.randrange(len(words))]
        pool = [w for w in self.vocab if w.lower() != m.group().lower()]
        return s[:m.start()] + "<...>" + s[m.end():], m.group(), self.rng.sample(pool, 3)

    def next_word(self, context: str) -> tuple[str, str, int]:
        """A question on `context` whose answer is a word of it: (question, answer, answer offset)."""
        words = list(_WORD.finditer(context))
        j = self.rng.randrange(len(words) - 1)
        ans = words[j + 1]
        return f"Quel mot suit « {words[j].group()} » dans le texte ?", ans.group(), ans.start()

    def four_choices(self, i: int) -> dict:
        q, ans, wrong = self.blank(i)
        choices = wrong + [ans]
        self.rng.shuffle(choices)
        return {"question": q, "choices": choices, "gold": choices.index(ans), "answer_text": ans}


def _rows_grammar_vocab_reading(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        c = f.four_choices(i)
        row = {"question": c["question"], "answer": "ABCD"[c["gold"]],
               **{f"answer{'ABCD'[k]}": c["choices"][k] for k in range(4)},
               "context": f.passage(i + 1, 2) if split == "Reading" else "",
               "difficulty": "facile", "language": "fr", "subject": split.lower(), "url": ""}
        rows.append(row)
    return rows


def _rows_boolq(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        passage = f.passage(i, 2)
        present = i % 2 == 0
        word = f.rng.choice([w for w in _WORD.findall(passage) if len(w) > 3]) if present else \
            f.rng.choice([w for w in f.vocab if w not in passage])
        rows.append({"passage": passage, "question": f"est-ce que le texte parle de « {word} »",
                     "label": int(present)})
    return rows


def _rows_fquad(f: _Fixture, split: str, n: int, start: int, multi: bool = False) -> list[dict]:
    rows = []
    has_ans_only = split.endswith("hasAns") or multi
    for i in range(start, start + n):
        context = f.passage(i, 3)
        impossible = not has_ans_only and i % 3 == 2
        if impossible:
            other = f.sentence(i + 7)
            q, _, _ = f.next_word(other)
            answers = {"answers_start": [], "text": []}
        else:
            q, ans, off = f.next_word(context)
            answers = {"answers_start": [off], "text": [ans]}
            if multi:
                q2, ans2, off2 = f.next_word(context)
                q = f"{q[:-2]} et quel mot suit « {q2.split('« ')[1].split(' »')[0]} » ?"
                answers = {"answers_start": [off, off2], "text": [ans, ans2]}
        rows.append({"title": f"Document {i}", "context": context, "question": q, "answers": answers,
                     "is_impossible": impossible})
    return rows


def _rows_topic_nli(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    polarities = ["positif", "negatif", "neutre"]
    rows = []
    for i in range(start, start + n):
        text = f.sentence(i)
        topic = f.rng.choice([w for w in _WORD.findall(text) if len(w) > 3])
        rows.append({"text": text, "topic": topic, "polarity": polarities[i % 3]})
    return rows


def _rows_xnli(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        premise = f.sentence(i)
        label = i % 3
        hypothesis = premise.split(",")[0].rstrip(".") + "." if label == 0 else (
            f.sentence(i + 5) if label == 1 else "Il est faux que " + premise[0].lower() + premise[1:])
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return rows


def _rows_arc(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        c = f.four_choices(i)
        rows.append({"id": f"fixture-{split}-{i}", "question": f"Quel mot complète la phrase « {c['question']} » ?",
                     "choices": c["choices"], "answerKey": "ABCD"[c["gold"]]})
    return rows


def _rows_hellaswag(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        words = f.sentence(i).split()
        cut = len(words) // 2
        endings = [" ".join(words[cut:])] + [" ".join(f.sentence(i + k).split()[cut:]) for k in (3, 5, 9)]
        gold = i % 4
        endings[0], endings[gold] = endings[gold], endings[0]
        rows.append({"ind": i, "activity_label": words[0].strip(",").capitalize(), "ctx_a": " ".join(words[:cut - 2]),
                     "ctx_b": " ".join(words[cut - 2:cut]), "ctx": " ".join(words[:cut]), "endings": endings,
                     "source_id": f"fixture-{i}", "split": split, "split_type": "indomain", "label": str(gold)})
    return rows


def _rows_trivia(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        s = f.sentence(i)
        q, ans, _ = f.next_word(s)
        rows.append({"Question": f"Dans la phrase « {s} », {q[0].lower()}{q[1:]}", "Answer": ans})
    return rows


def _rows_orangesum(f: _Fixture, split: str, n: int, start: int, title: bool) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        text = f.passage(i, 4)
        first = f.sentence(i)
        summary = " ".join(first.split()[:6]) if title else first
        rows.append({"text": text, "summary": summary})
    return rows


def _rows_opus(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    return [{"id": i, "text": f.sentence(i)} for i in range(start, start + n)]


def _rows_wikitext(f: _Fixture, split: str, n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        para = f.passage(i, 2)
        # wikitext's own tokenisation, which the task's detokenizer undoes.
        para = re.sub(r"([,.;:!?])", r" \1", para).replace("-", " @-@ ")
        rows.append({"paragraph": " " + para + " \n"})
    return rows


# (dataset_path, dataset_name) -> row builder(fixture, split, n, start)
FIXTURE_BUILDERS: dict[tuple[str, str | None], Callable] = {
    ("manu/french-bench-grammar-vocab-reading", None): _rows_grammar_vocab_reading,
    ("manu/french_boolq", None): _rows_boolq,
    ("manu/fquad2_test", None): _rows_fquad,
    ("manu/multifquad_test", None): functools.partial(_rows_fquad, multi=True),
    ("manu/topic_based_nli_test", None): _rows_topic_nli,
    ("facebook/xnli", "fr"): _rows_xnli,
    ("manu/french_bench_arc_challenge", None): _rows_arc,
    ("manu/french_bench_hellaswag", None): _rows_hellaswag,
    ("manu/french-trivia", None): _rows_trivia,
    ("orange_sum", "abstract"): functools.partial(_rows_orangesum, title=False),
    ("orange_sum", "title"): functools.partial(_rows_orangesum, title=True),
    ("manu/opus100-en-fr", None): _rows_opus,
    ("asi/wikitext_fr", "wikitext-35"): _rows_wikitext,
}


def datasets_of(tasks: Iterable[str]) -> dict[tuple[str, str | None], set[str]]:
    """{(dataset_path, dataset_name): splits needed} for the given tasks."""
    out: dict[tuple[str, str | None], set[str]] = {}
    for t in tasks:
        cfg = task_config(t)
        out.setdefault((cfg["dataset_path"], cfg.get("dataset_name")), set()).update(task_splits(cfg))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def make_fixtures(out_dir: str | os.PathLike, text: str | None = None, rows: int = 8,
                  tasks: str | Iterable[str] = ("french_bench", "french_bench_perplexity"), seed: int = 0) -> Path:
    """Write a small FrenchBench-format data directory built from French `text` (default: a
    built-in paragraph). Every split of every task gets `rows` distinct rows (>= 4 for 3-shot)."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    sentences = _sentences(text if text is not None else DEFAULT_TEXT)
    out = Path(out_dir)
    for (path, name), splits in sorted(datasets_of(expand_tasks(tasks)).items(), key=str):
        builder = FIXTURE_BUILDERS.get((path, name))
        if builder is None:
            raise KeyError(f"no fixture schema for dataset {path} ({name}); the installed lm-eval has a task "
                           f"this module does not know")
        for k, split in enumerate(sorted(splits)):
            fx = _Fixture(sentences, seed=zlib.crc32(f"{path}/{name}/{split}/{seed}".encode()))
            target = out / path / name / f"{split}.jsonl" if name else out / path / f"{split}.jsonl"
            _write_jsonl(target, builder(fx, split, rows, 1 + 3 * k))
    return out


def download(out_dir: str | os.PathLike, tasks: str | Iterable[str] = ("french_bench", "french_bench_perplexity"),
             log: Callable[[str], None] = print) -> dict[str, str]:
    """Fetch the tasks' datasets from the hub into `out_dir` (the local layout). Returns
    {dataset: error} for the datasets that could not be fetched (e.g. loading-script datasets)."""
    import datasets

    failed: dict[str, str] = {}
    for (path, name), splits in sorted(datasets_of(expand_tasks(tasks)).items(), key=str):
        label = f"{path}" + (f" ({name})" if name else "")
        base = Path(out_dir) / path / (name or "")
        for split in sorted(splits):
            target = base / f"{split}.jsonl"
            if target.is_file():
                log(f"{label} {split}: already there")
                continue
            try:
                ds = datasets.load_dataset(path, name, split=split)
            except Exception as e:  # the hub, a loading script, a network error: report and go on
                failed[label] = f"{type(e).__name__}: {e}"
                log(f"{label} {split}: FAILED ({failed[label][:200]})")
                break
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            ds.to_json(str(tmp), force_ascii=False)
            os.replace(tmp, target)
            log(f"{label} {split}: {len(ds)} rows -> {target}")
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m apps.eval_data", description="FrenchBench data: offline fixtures or a local copy of the hub data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m apps.eval_data --make-fixtures runs/fb-fixtures --text corpus_fr.txt --rows 8\n"
               "  python -m apps.eval_data --download data/french_bench --tasks french_bench,french_bench_perplexity\n"
               "  python -m apps.eval --model runs/rodin-tiny/final --data-dir runs/fb-fixtures --limit 4")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-fixtures", metavar="DIR", help="write a small FrenchBench-format dataset to DIR")
    mode.add_argument("--download", metavar="DIR", help="download the tasks' datasets from the hub to DIR (online)")
    mode.add_argument("--list", action="store_true", help="list tasks, tags, datasets and splits")
    p.add_argument("--text", help="French text file the fixtures are built from (default: built-in sentences)")
    p.add_argument("--rows", type=int, default=8, help="rows per split for --make-fixtures (default 8)")
    p.add_argument("--tasks", default="french_bench,french_bench_perplexity",
                   help="tasks or tags, comma-separated (default: all FrenchBench tasks)")
    args = p.parse_args(argv)
    tasks = expand_tasks(args.tasks)
    if args.list:
        index = task_manager().task_index
        for tag in TAGS:
            print(f"{tag}: {', '.join(sorted(index[tag].tags))}")
        for t in tasks:
            cfg = task_config(t)
            print(f"{t}: {cfg['dataset_path']}{' / ' + cfg['dataset_name'] if cfg.get('dataset_name') else ''} "
                  f"splits {', '.join(task_splits(cfg))}")
        return 0
    if args.make_fixtures:
        text = Path(args.text).read_text(encoding="utf-8") if args.text else None
        out = make_fixtures(args.make_fixtures, text, rows=args.rows, tasks=tasks)
        print(f"wrote FrenchBench-format fixtures for {len(tasks)} tasks to {out}")
        return 0
    failed = download(args.download, tasks)
    for label, err in failed.items():
        print(f"could not download {label}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
