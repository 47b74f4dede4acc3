"""Benchmark: one-command GGUF q4_k_m export against llama.cpp's converter + quantizer.

    python -m benchmarks.export [--workdir /tmp/rodin-export-bench] [--skip-reference]

At the rodin-1b shape (1.24B parameters, random bf16 weights; an HF Llama directory written by
the benchmark itself, with a 64,000-piece SentencePiece tokenizer trained on the French Debian
documentation installed on the machine), it measures in the same run:

1. wall time and peak RSS of `python -m export.gguf --quant q4_k_m` (FFN padded, the default),
2. the same for llama.cpp: `convert_hf_to_gguf.py --outtype f16` (from the llama-cpp-python
   sdist, with its own vendored gguf-py) then `llama_model_quantize(..., Q4_K_M)`,
3. llama.cpp decode speed (tokens/s, llama-cpp-python, greedy single-token steps) of our padded
   q4_k_m against llama.cpp's own q4_k_m, and the file sizes (ours unpadded as well).

Targets: time <= 1.0x the reference, peak RSS <= 1.2 GB, decode speed >= 1.2x.
Every step runs in its own process; peak RSS is that process's ru_maxrss (os.wait4).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import html
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LCP_VERSION = "0.3.36"
TARGET_TIME, TARGET_RSS_GB, TARGET_SPEED = 1.0, 1.2, 1.2


def run(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """Run a command; its wall time and peak RSS (that process tree's ru_maxrss)."""
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{label} failed ({p.returncode}):\n{out[-3000:]}")
    r = {"label": label, "wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 3)}
    print(f"[{label}] {r['wall_s']} s, peak RSS {r['peak_rss_gb']} GB", flush=True)
    return r


# ----------------------------------------------------------------------------- inputs


def french_documents() -> list[str]:
    """Plain text of the French documentation installed by Debian packages."""
    docs = []
    for f in sorted(glob.glob("/usr/share/doc/debian-handbook/html/fr-FR/*.html")
                    + glob.glob("/usr/share/doc/debian-reference-fr/**/*.html", recursive=True)):
        raw = Path(f).read_text(errors="ignore")
        raw = re.sub(r"(?s)<(script|style)[^>]*>.*?</\1>", " ", raw)
        text = html.unescape(re.sub(r"<[^>]+>", " ", raw))
        docs.append(re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n", text)))
    for f in sorted(glob.glob("/usr/share/man/fr/**/*.gz", recursive=True)):
        try:
            raw = gzip.decompress(Path(f).read_bytes()).decode("utf-8", errors="ignore")
        except OSError:
            continue
        lines = [re.sub(r"\\f[BIRP]|\\-|\\&|\\\(..", "", ln) for ln in raw.splitlines() if not ln.startswith((".", "'"))]
        docs.append("\n".join(lines))
    return [d for d in docs if d.strip()]


def make_tokenizer(out_dir: Path, vocab_size: int) -> dict:
    """Train the 64K French tokenizer; pad with unreachable unique pieces if the corpus is too small."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from rodin.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    docs = french_documents()
    chars = sum(map(len, docs))
    print(f"[tokenizer] {len(docs)} French documents, {chars / 1e6:.1f} M characters", flush=True)
    trained = vocab_size
    while True:
        try:
            path = train_tokenizer(docs, out_dir, vocab_size=trained)
            break
        except RuntimeError as e:
            m = re.search(r"<= (\d+)", str(e))
            if not m or trained <= 1000:
                raise
            trained = int(m.group(1))
            print(f"[tokenizer] corpus supports at most {trained} pieces; training that and padding", flush=True)
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    have = {p.piece for p in proto.pieces}
    low = min(p.score for p in proto.pieces) - 1.0
    i = 0
    while len(proto.pieces) < vocab_size:  # unreachable by merges: encoding is unchanged
        piece = f"▁<pad{i}>"
        i += 1
        if piece not in have:
            proto.pieces.add(piece=piece, score=low, type=pb.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    path.write_bytes(proto.SerializeToString())
    return {"trained_pieces": trained, "pieces": len(proto.pieces), "corpus_chars": chars,
            "seconds": round(time.perf_counter() - t0, 1)}


def make_hf_dir(out: Path, tok_dir: Path) -> None:
    """A random-weight LlamaForCausalLM directory at the rodin-1b shape (bf16), written tensor by tensor."""
    import torch
    from safetensors.torch import save_file

    from export.hf import write_tokenizer_files
    from rodin.checkpoint import to_hf_config, to_hf_name
    from rodin.config import ModelConfig
    from rodin.tokenizer import Tokenizer
    from rodin.checkpoint import expected_shapes

    cfg = ModelConfig.from_name("rodin-1b")
    tok = Tokenizer(tok_dir)
    assert tok.vocab_size == cfg.vocab_size, (tok.vocab_size, cfg.vocab_size)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            sd[to_hf_name(name)] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            sd[to_hf_name(name)] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    del sd
    (out / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2))
    write_tokenizer_files(tok, out, chat_template=None, context_length=cfg.context_length)


def llama_cpp_tree(workdir: Path) -> Path | None:
    """The llama.cpp tree vendored in the llama-cpp-python sdist (pip download, no build)."""
    root = workdir / f"llama_cpp_python-{LCP_VERSION}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    sdists = glob.glob(f"/tmp/lcp/llama_cpp_python-{LCP_VERSION}.tar.gz") or glob.glob(str(workdir / "*.tar.gz"))
    if not sdists:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LCP_VERSION}", "-d", str(workdir)], capture_output=True, text=True)
        sdists = glob.glob(str(workdir / "*.tar.gz"))
        if r.returncode or not sdists:
            print(f"[reference] cannot download the llama-cpp-python sdist: {r.stderr[-500:]}")
            return None
    with tarfile.open(sdists[0]) as t:
        members = [m for m in t.getmembers() if "/vendor/llama.cpp/" in m.name and
                   ("/gguf-py/" in m.name or "/conversion/" in m.name or m.name.endswith("convert_hf_to_gguf.py"))]
        t.extractall(workdir, members=members, filter="data")
    return root if (root / "convert_hf_to_gguf.py").is_file() else None


QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = {threads}
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""

DECODE = """
import sys, time, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads={threads}, n_batch=64, verbose=False)
prompt = llm.tokenize("La Révolution française a commencé en 1789 et".encode(), add_bos=True)
llm.eval(prompt)
for i in range(4):  # warm-up
    llm.eval([100 + i])
t0 = time.perf_counter()
for i in range({n}):
    llm.eval([200 + i])
print({n} / (time.perf_counter() - t0))
"""


def decode_speed(files: dict[str, Path], threads: int, n: int = 32, reps: int = 3) -> dict[str, dict]:
    """Greedy-step decode tokens/s of each GGUF: one process per measurement, models interleaved,
    `reps` rounds; best and median (a shared machine only ever slows a run down)."""
    import statistics

    code = DECODE.format(threads=threads, n=n)
    runs: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(reps):
        for name, path in files.items():
            out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
            runs[name].append(float(out.stdout.strip().splitlines()[-1]))
    return {k: {"best": round(max(v), 2), "median": round(statistics.median(v), 2), "runs": [round(x, 2) for x in v]}
            for k, v in runs.items()}


def _ratios(speeds: dict) -> dict:
    """ours padded / llama.cpp: ratio of best runs, of medians, and median of the per-round ratios."""
    import statistics

    o, r = speeds["ours_padded"], speeds["llama_cpp"]
    return {"best": round(o["best"] / r["best"], 3), "median": round(o["median"] / r["median"], 3),
            "paired_median": round(statistics.median(x / y for x, y in zip(o["runs"], r["runs"])), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m benchmarks.export --workdir /tmp/rodin-export-bench")
    p.add_argument("--workdir", default="/tmp/rodin-export-bench", help="where inputs and outputs go (kept)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp quantizer threads (default: all cores)")
    p.add_argument("--skip-reference", action="store_true", help="only measure our exporter")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode-speed run")
    p.add_argument("--decode-reps", type=int, default=5, help="decode-speed rounds (best and median reported)")
    p.add_argument("--decode-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="llama.cpp decode threads (default: llama-cpp-python's own default, half the cores)")
    p.add_argument("--decode-only", action="store_true", help="only re-measure decode speed on existing files")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{os.cpu_count()} cores", "shape": "rodin-1b (random bf16 weights)",
                     "load_avg_start": os.getloadavg()[0]}

    tok_dir, hf = work / "tokenizer", work / "rodin-1b-random-hf"
    if not (tok_dir / "tokenizer.model").is_file():
        results["tokenizer"] = make_tokenizer(tok_dir, 64000)
        print(f"[tokenizer] {results['tokenizer']}", flush=True)
    if not (hf / "model.safetensors").is_file():
        t0 = time.perf_counter()
        make_hf_dir(hf, tok_dir)
        results["hf_dir_seconds"] = round(time.perf_counter() - t0, 1)

    ours, ours_plain = work / "ours-Q4_K_M.gguf", work / "ours-nopad-Q4_K_M.gguf"
    py = sys.executable
    if a.decode_only:
        speeds = decode_speed({"ours_padded": ours, "llama_cpp": work / "ref-Q4_K_M.gguf", "ours_nopad": ours_plain},
                              a.decode_threads, a.decode_tokens, a.decode_reps)
        print(json.dumps(speeds, indent=2))
        print(f"decode ({a.decode_threads} threads): ours padded / llama.cpp = {_ratios(speeds)} "
              f"(target >= {TARGET_SPEED}x)")
        return 0
    results["ours"] = run([py, "-m", "export.gguf", "--model", str(hf), "--quant", "q4_k_m", "--out", str(ours),
                           "--no-progress"], "ours q4_k_m (padded)", env={"PYTHONPATH": str(ROOT)})
    results["ours_nopad"] = run([py, "-m", "export.gguf", "--model", str(hf), "--quant", "q4_k_m", "--no-pad-ffn",
                                 "--out", str(ours_plain), "--no-progress"], "ours q4_k_m (--no-pad-ffn)",
                                env={"PYTHONPATH": str(ROOT)})
    sizes = {"ours_padded": ours.stat().st_size, "ours_nopad": ours_plain.stat().st_size}

    tree = None if a.skip_reference else llama_cpp_tree(work)
    if tree is None:
        print("[reference] skipped: llama.cpp's convert_hf_to_gguf.py is not available "
              "(needs the llama-cpp-python sdist: pip download --no-deps --no-binary :all: llama-cpp-python)")
    else:
        f16, ref = work / "ref-f16.gguf", work / "ref-Q4_K_M.gguf"
        conv = run([py, str(tree / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16", "--outfile", str(f16)],
                   "llama.cpp convert_hf_to_gguf f16", env={"PYTHONPATH": str(tree / "gguf-py")})
        quant = run([py, "-c", QUANTIZE.format(threads=a.threads), str(f16), str(ref)], "llama.cpp quantize q4_k_m")
        results["reference"] = {"convert": conv, "quantize": quant,
                                "wall_s": round(conv["wall_s"] + quant["wall_s"], 2),
                                "peak_rss_gb": max(conv["peak_rss_gb"], quant["peak_rss_gb"])}
        sizes["llama_cpp"] = ref.stat().st_size
        f16.unlink()
        speeds = decode_speed({"ours_padded": ours, "llama_cpp": ref, "ours_nopad": ours_plain},
                              a.decode_threads, a.decode_tokens, a.decode_reps)
        results["decode_tokens_per_s"] = speeds
        results["time_ratio"] = round(results["ours"]["wall_s"] / results["reference"]["wall_s"], 3)
        results["decode_speed_ratio"] = _ratios(speeds)
    results["sizes_bytes"] = sizes
    results["load_avg_end"] = os.getloadavg()[0]

    print(f"\n=== export benchmark (rodin-1b shape, q4_k_m; load average {results['load_avg_start']:.1f} at "
          f"start, {results['load_avg_end']:.1f} at end on {results['machine']}) ===")
    o = results["ours"]
    print(f"ours (padded FFN)   {o['wall_s']:7.1f} s  peak RSS {o['peak_rss_gb']:.2f} GB  "
          f"{sizes['ours_padded'] / 1e9:.3f} GB file  (target RSS <= {TARGET_RSS_GB} GB)")
    o = results["ours_nopad"]
    print(f"ours (--no-pad-ffn) {o['wall_s']:7.1f} s  peak RSS {o['peak_rss_gb']:.2f} GB  "
          f"{sizes['ours_nopad'] / 1e9:.3f} GB file")
    if "reference" in results:
        r = results["reference"]
        print(f"llama.cpp           {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_gb']:.2f} GB  "
              f"{sizes['llama_cpp'] / 1e9:.3f} GB file  (convert {r['convert']['wall_s']} s + "
              f"quantize {r['quantize']['wall_s']} s)")
        print(f"time ratio ours/llama.cpp: {results['time_ratio']:.2f}x (target <= {TARGET_TIME}x)")
        s = results["decode_tokens_per_s"]
        print(f"decode tokens/s ({a.decode_threads} threads, {a.decode_reps} interleaved rounds, best / median): "
              f"ours padded {s['ours_padded']['best']} / {s['ours_padded']['median']}, ours unpadded "
              f"{s['ours_nopad']['best']} / {s['ours_nopad']['median']}, llama.cpp {s['llama_cpp']['best']} / "
              f"{s['llama_cpp']['median']}")
        print(f"decode speed ours padded / llama.cpp: {results['decode_speed_ratio']} (target >= {TARGET_SPEED}x)")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
