"""FrenchBench through lm-eval, offline, on fixtures that mirror every task's schema: our model
class, lm-eval's own `hf` model on the HF export, a hand-computed multiple-choice example,
missing data, the report files and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.eval import main as eval_main, run_eval, write_demo_fixtures
from apps.eval_data import all_tasks, expand_tasks, main as eval_data_main, rouge1_mean
from apps.eval_report import CATEGORIES, load_run
from rodin.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
ALL = "french_bench,french_bench_perplexity"
LL_METRICS = {"acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine every small
    op would wait for a descheduled second thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub: datasets and huggingface_hub read local files only; json caches in a temp dir."""
    import datasets

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fb_data")
    assert eval_data_main(["--make-fixtures", str(out), "--rows", "5"]) == 0
    return out


@pytest.fixture(scope="module")
def rodin_run(tmp_path_factory, model_dir, data_dir):
    out = tmp_path_factory.mktemp("run_rodin")
    return run_eval(str(model_dir), ALL, out_dir=out, data_dir=data_dir, limit=2, num_fewshot=3, max_gen_toks=6,
                    log_samples=True, batch_size=8, compare=["reference"])


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory, model_dir, data_dir):
    """lm-eval's `hf` model on the fp32 HF export. With add_bos_token=True its rolling
    loglikelihood also puts BOS in the scored text (BOS after BOS, the text after two BOS), so
    the perplexity tasks run with add_bos_token=False: the standard computation, BOS as prefix."""
    out = tmp_path_factory.mktemp("run_hf")
    mc = run_eval(str(model_dir), "french_bench", out_dir=out / "mc", backend="hf", data_dir=data_dir, limit=2,
                  num_fewshot=3, max_gen_toks=6, log_samples=True, batch_size=8)
    ppl = run_eval(str(model_dir), "french_bench_perplexity", out_dir=out / "ppl", backend="hf", data_dir=data_dir,
                   limit=2, log_samples=True, batch_size=8, model_kwargs={"add_bos_token": False})
    return mc, ppl


def samples(run, task):
    path = Path(run.path) / f"samples_{task}.jsonl"
    return {r["doc_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_fixtures_cover_every_task_schema(data_dir):
    tasks = expand_tasks(ALL)
    assert sorted(tasks) == all_tasks() and len(tasks) == 18
    row = json.loads((data_dir / "manu/fquad2_test/test_hasAns.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"title", "context", "question", "answers", "is_impossible"}
    assert row["context"][row["answers"]["answers_start"][0]:].startswith(row["answers"]["text"][0])
    vocab = [json.loads(x) for x in (data_dir / "manu/french-bench-grammar-vocab-reading/Vocabulary.jsonl").read_text().splitlines()]
    assert len({r["question"] for r in vocab}) == len(vocab) == 5 and all("<...>" in r["question"] for r in vocab)


def test_every_task_runs_with_our_model_class(rodin_run):
    res = rodin_run.results["results"]
    assert sorted(res) == all_tasks()
    assert not rodin_run.meta["missing"]
    for task in all_tasks():
        values = {k.split(",")[0]: v for k, v in res[task].items() if "," in k and "_stderr" not in k}
        assert values, task
        for metric, v in values.items():
            assert isinstance(v, float) and v == v, (task, metric, v)  # not NaN
        assert rodin_run.results["n-samples"][task]["effective"] == 2
    assert set(rodin_run.results["n-shot"].values()) == {0, 3}  # perplexity tasks are 0-shot by definition
    assert "rouge1,none" in res["french_bench_orangesum_abstract"]  # ROUGE offline
    assert res["french_bench_wikitext_fr"]["word_perplexity,none"] > 1


def test_hf_backend_agrees_on_loglikelihood_metrics(rodin_run, hf_runs):
    mc, ppl = hf_runs
    assert not mc.meta["missing"] and not ppl.meta["missing"]
    assert sorted([*mc.results["results"], *ppl.results["results"]]) == all_tasks()
    compared = 0
    for hf in (mc, ppl):
        for task, r in hf.results["results"].items():
            ours = rodin_run.results["results"][task]
            for key, v in r.items():
                if key.split(",")[0] in LL_METRICS:
                    assert ours[key] == pytest.approx(v, rel=1e-4), (task, key)
                    compared += 1
            if hf.results["configs"][task]["output_type"] in ("multiple_choice", "loglikelihood_rolling"):
                ours_s, hf_s = samples(rodin_run, task), samples(hf, task)
                for doc_id, row in hf_s.items():
                    a = [x[0] if isinstance(x, list) else x for x in row["filtered_resps"]]
                    b = [x[0] if isinstance(x, list) else x for x in ours_s[doc_id]["filtered_resps"]]
                    assert [float(x) for x in b] == pytest.approx([float(x) for x in a], abs=1e-3), (task, doc_id)
    assert compared >= 20


def test_greedy_generations_match_hf(rodin_run, hf_runs):
    mc, _ = hf_runs
    gen_tasks = [t for t, c in mc.results["configs"].items() if c["output_type"] == "generate_until"]
    assert len(gen_tasks) == 7
    for task in gen_tasks:
        ours, hf = samples(rodin_run, task), samples(mc, task)
        for doc_id in hf:
            assert ours[doc_id]["filtered_resps"][0].strip() == hf[doc_id]["filtered_resps"][0].strip(), task


def test_hand_computed_multiple_choice(tmp_path, model_dir, tokenizer):
    """Five vocab questions, 0-shot. The gold answer is set to the choice the model prefers
    (computed here with one plain forward per choice) for three questions and to the one it
    likes least for two: accuracy must be 3/5, and each per-choice loglikelihood must match."""
    model, _ = load_model(model_dir)
    context = "La phrase suivante est logique sémantiquement:"  # the task's text, its "\n" moves to the choice
    questions = [("Le chat <...> sur le canapé.", ["dort", "mange", "court", "vole"]),
                 ("La <...> tombe doucement sur Paris.", ["pluie", "neige", "table", "route"]),
                 ("Les élèves étudient au <...>.", ["collège", "marché", "ciel", "fleuve"]),
                 ("Le train part de la <...> de Lyon.", ["gare", "mer", "forêt", "lune"]),
                 ("Molière a écrit des <...> célèbres.", ["comédies", "voitures", "rivières", "nuages"])]
    ctx_ids = tokenizer.encode(context, bos=True)
    rows, expected_ll = [], []
    for k, (q, answers) in enumerate(questions):
        lls = []
        for a in answers:
            whole = tokenizer.encode(context + "\n " + q.replace("<...>", a), bos=True)
            assert whole[:len(ctx_ids)] == ctx_ids
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor(whole[:-1])[None])[0].float(), -1)
            lls.append(sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx_ids), len(whole))))
        gold = max(range(4), key=lls.__getitem__) if k < 3 else min(range(4), key=lls.__getitem__)
        expected_ll.append(lls)
        rows.append({"question": q, "answer": "ABCD"[gold], **{f"answer{'ABCD'[i]}": a for i, a in enumerate(answers)},
                     "context": ""})
    d = tmp_path / "data" / "manu" / "french-bench-grammar-vocab-reading"
    d.mkdir(parents=True)
    (d / "Vocabulary.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    run = run_eval(str(model_dir), "vocab", out_dir=tmp_path / "run", data_dir=tmp_path / "data", num_fewshot=0,
                   log_samples=True)
    assert run.results["results"]["french_bench_vocab"]["acc,none"] == pytest.approx(3 / 5)
    got = samples(run, "french_bench_vocab")
    for k in range(5):
        lls = [x[0] for x in got[k]["filtered_resps"]]
        assert lls == pytest.approx(expected_ll[k], abs=1e-4)
        assert got[k]["acc"] == (1.0 if k < 3 else 0.0)


def test_report_files_and_charts(rodin_run):
    out = Path(rodin_run.path)
    for name in ("results.json", "run.json", "report.md", "tasks.png", "categories.png", "comparison.md",
                 "comparison.png", "comparison_categories.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert {"results", "configs", "versions", "n-shot", "config"} <= set(results)  # lm-eval's JSON as is
    report = (out / "report.md").read_text()
    for cat, tasks in CATEGORIES.items():
        mean = sum(results["results"][f"french_bench_{t}"][("acc_norm" if t in ("topic_based_nli", "hellaswag",
                   "arc_challenge") else "f1" if t in ("trivia", "fquadv2_genq", "fquadv2") else "acc") + ",none"]
                   for t in tasks) / len(tasks)
        assert f"| {cat} | {', '.join(tasks)} | {mean:.3f} |" in report
    assert "| vocab | linguistic competence | **acc** |" in report
    assert "0.773" in report  # the released model's score next to ours
    comparison = (out / "comparison.md").read_text()
    assert "RODIN-1B (model card)" in comparison and "Δ vs" in comparison
    reloaded = load_run(out)
    assert reloaded.score("vocab")[1] == results["results"]["french_bench_vocab"]["acc,none"]


def test_missing_dataset_is_reported_not_fatal(tmp_path, model_dir, data_dir, capsys):
    partial = tmp_path / "partial"
    write_demo_fixtures(partial, rows=4)
    for sub in ("facebook/xnli", "manu/french-trivia"):
        for f in (partial / sub).rglob("*.jsonl"):
            f.unlink()
    run = run_eval(str(model_dir), "vocab,xnli,trivia", out_dir=tmp_path / "run", data_dir=partial, limit=1,
                   max_gen_toks=4)
    assert list(run.results["results"]) == ["french_bench_vocab"]
    missing = run.meta["missing"]
    assert set(missing) == {"french_bench_xnli", "french_bench_trivia"}
    assert "test.jsonl" in missing["french_bench_xnli"] and "validation.jsonl" in missing["french_bench_xnli"]
    assert str(partial / "facebook" / "xnli" / "fr") in missing["french_bench_xnli"]
    assert "--download" in missing["french_bench_trivia"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Tasks not run (data missing)" in report and "**xnli**" in report
    assert "french_bench_xnli: no local data" in capsys.readouterr().out
    # No data dir and no hub: a clear message per task instead of a crash.
    run = run_eval(str(model_dir), "boolqa", out_dir=tmp_path / "run_hub", limit=1)
    msg = run.meta["missing"]["french_bench_boolqa"]
    assert "manu/french_boolq" in msg and "offline" in msg and "--data-dir" in msg


def test_rouge1_is_computed_offline():
    # rouge_score's default tokenizer: lowercase ASCII words ("é" splits words, as upstream).
    assert rouge1_mean([("le chat dort", "le chat mange")]) == pytest.approx(2 / 3)
    assert rouge1_mean([("le chat dort", "le chat dort"), ("un deux", "trois")]) == pytest.approx(0.5)


def test_cli_perplexity_and_compare(tmp_path, model_dir, data_dir, rodin_run, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text("Le petit chat dort sur le canapé.\n\nLa pluie tombe doucement sur Paris, "
                    "et les passants se pressent sous leurs parapluies.\n", encoding="utf-8")
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([sys.executable, "-m", "apps.eval", "--model", str(model_dir), "--tasks", "grammar,boolqa",
                           "--data-dir", str(data_dir), "--limit", "2", "--perplexity", str(text), "--out", str(out),
                           "--compare", str(rodin_run.path), "reference", "--label", "cli"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "french_bench_grammar" in proc.stdout and "perplexity: token" in proc.stdout
    run = load_run(out)
    ppl = run.meta["perplexity"]
    docs = [d.strip() for d in text.read_text().split("\n\n")]
    assert ppl["docs"] == 2 and ppl["words"] == sum(len(d.split()) for d in docs) == 21
    assert ppl["bytes"] == sum(len(d.encode()) for d in docs)
    assert 1 < ppl["token_perplexity"] < 1e4 and ppl["bits_per_byte"] > 0
    # grammar and boolqa are the same computation as in the full run (same data, limit, shots).
    assert run.score("grammar")[1] == rodin_run.score("grammar")[1]
    comparison = (out / "comparison.md").read_text()
    assert "| cli |" in comparison or "cli |" in comparison
    assert eval_main(["--model", str(tmp_path / "nope"), "--tasks", "vocab", "--data-dir", str(data_dir),
                      "--out", str(tmp_path / "bad")]) == 2
    assert "model not found" in capsys.readouterr().err
