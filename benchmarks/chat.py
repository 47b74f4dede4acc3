"""Chat demo latency and throughput: time to first token and tokens/s through the served app,
per backend (PyTorch, llama.cpp on an f32 GGUF export), for the rodin-tiny and rodin-1b shapes.

    python -m benchmarks.chat                          # both shapes, both backends
    python -m benchmarks.chat --shapes rodin-tiny --new-tokens 64

Each figure comes with a reference measured in the same run, on the same machine:
- "app" = a real `apps.chat` server (in process, Gradio queue, HTTP + SSE) driven by gradio_client;
- "direct" = the same backend called in Python (`apps.backends.start_chat`), no server: app/direct
  is the cost of serving;
- "llama.cpp native" = llama-cpp-python's own generation loop (`Llama.generate`, greedy) on the
  same prompt ids: our GGUF backend / native is the cost of driving llama.cpp's logits through
  rodin's sampling loop.

Weights are random (nothing can be downloaded here). The models use a small SentencePiece
tokenizer while keeping the preset's full vocabulary (8000 / 64000 rows, so the output layer
costs what it costs in the real model): the rows past the tokenizer, EOS and the ChatML markers
are zeroed, so their logits are 0 and greedy decoding never picks them, and every reply runs to
exactly --new-tokens tokens. Models and exports are built under --workdir (deleted unless
--keep). The rodin-1b shape needs ~5 GB per copy in fp32 (model dir, GGUF, each loaded model).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from apps.backends import load_backend, start_chat  # noqa: E402
from rodin.chat import DEFAULT_SYSTEM_PROMPT, STOP_STRINGS, encode_prompt, jinja_template  # noqa: E402
from rodin.checkpoint import save_model  # noqa: E402
from rodin.config import ModelConfig  # noqa: E402
from rodin.model import Transformer  # noqa: E402
from rodin.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

TEXTS = [
    "Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur Paris.",
    "Où est la bibliothèque ? Elle se trouve à côté de l'église, près de la rivière.",
    "En 1789, la Révolution française a profondément changé la société et ses institutions.",
    "Les élèves étudient les mathématiques, le français, l'histoire et la géographie au collège.",
    "Il était une fois une princesse qui vivait dans un château au bord de la mer.",
    "Debian est un système d'exploitation libre, développé par des milliers de bénévoles.",
] * 30
MESSAGE = "Raconte-moi une histoire sur un chat qui vit à Paris."


def build_model(shape: str, tok: Tokenizer, out: Path) -> Path:
    if (out / "model.safetensors").exists():  # kept from an earlier run (--keep)
        return out
    cfg = ModelConfig.from_name(shape)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        emb = model.tok_emb.weight  # tied with the output layer
        emb[tok.vocab_size:] = 0
        for i in [tok.eos_id] + [tok.piece_to_id(s) for s in STOP_STRINGS]:
            emb[i] = 0
    path = save_model(model, out, tokenizer=tok, chat_template=jinja_template())
    del model
    gc.collect()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(ttfts: list[float], totals: list[float], n: int) -> dict:
    """Median time to first token, and end-to-end tokens/s (n tokens over the whole request, prefill
    included): chunks can reach an HTTP client in bursts, so a rate between the first and the last
    chunk would not be comparable across paths."""
    return {"ttft_ms": 1000 * statistics.median(ttfts), "tokens_per_s": n / statistics.median(totals)}


def _forget_prompt(backend) -> None:
    """llama.cpp keeps the last prompt evaluated and reuses it; forget it so every run pays its prefill."""
    if hasattr(backend, "llm"):
        backend.llm.reset()


def bench_direct(backend, messages, new_tokens: int, runs: int) -> dict:
    ttfts, totals = [], []
    for _ in range(runs):
        _forget_prompt(backend)
        t0 = time.perf_counter()
        reply = start_chat(backend, messages, new_tokens).reply
        first = None
        for _chunk in reply:
            first = first or time.perf_counter()
        end = time.perf_counter()
        n = len(reply.result.token_ids)
        assert n == new_tokens, f"expected {new_tokens} tokens, got {n} ({reply.result.finish_reason})"
        ttfts.append(first - t0)
        totals.append(end - t0)
    return _summary(ttfts, totals, new_tokens)


def bench_app(backend, messages, new_tokens: int, runs: int) -> dict:
    from gradio_client import Client

    from apps.chat import ChatApp, launch

    app = ChatApp(backend, "chat", max_new_tokens=new_tokens)
    port = _free_port()
    demo = launch(app, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        ttfts, totals = [], []
        for _ in range(runs):
            _forget_prompt(backend)
            t0 = time.perf_counter()
            job = client.submit(messages[-1]["content"], [], messages[0]["content"], 0.0, 1.0, 0, 1.0, new_tokens, -1,
                                api_name="/chat")
            first = None
            while not job.done():
                if first is None and any(r for r, _ in job.outputs()):
                    first = time.perf_counter()
                time.sleep(0.001)
            job.result()
            end = time.perf_counter()
            first = first or end
            n = len(app.last_result.token_ids)
            assert n == new_tokens, f"expected {new_tokens} tokens, got {n}"
            ttfts.append(first - t0)
            totals.append(end - t0)
        return _summary(ttfts, totals, new_tokens)
    finally:
        demo.close()


def bench_llama_native(backend, prompt_ids: list[int], new_tokens: int, runs: int) -> dict:
    llm = backend.llm
    ttfts, totals = [], []
    for _ in range(runs):
        llm.reset()
        t0 = time.perf_counter()
        first, n = None, 0
        for _tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            first = first or time.perf_counter()
            n += 1
            if n == new_tokens:
                break
        end = time.perf_counter()
        ttfts.append(first - t0)
        totals.append(end - t0)
    llm.reset()
    return _summary(ttfts, totals, new_tokens)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m benchmarks.chat --shapes rodin-tiny rodin-1b --runs 3")
    p.add_argument("--shapes", nargs="+", default=["rodin-tiny", "rodin-1b"], help="model presets to build")
    p.add_argument("--backends", nargs="+", default=["pytorch", "llama.cpp"], choices=["pytorch", "llama.cpp"])
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per reply (default 64 tiny, 16 for 1b)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per figure (median), after one warm-up")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both backends")
    p.add_argument("--workdir", help="where models and GGUFs are built (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep --workdir")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Everything runs in a worker thread, as generation does in the server: on a busy machine
    # PyTorch's OpenMP pool in the main thread was measured 10-50x slower than in other threads
    # (the spinning of its workers), which would make "direct" an unfair reference.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run, args).result()


def run(args: argparse.Namespace) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-chat-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        tok = Tokenizer(train_tokenizer(TEXTS, work / "tok", vocab_size=512))
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": MESSAGE}]
        prompt_ids = encode_prompt(tok, messages)
        print(f"prompt: {len(prompt_ids)} tokens; machine: {os.cpu_count()} CPUs, {args.threads} threads; "
              f"torch {torch.__version__}")
        for shape in args.shapes:
            n_new = args.new_tokens or (16 if shape == "rodin-1b" else 64)
            t = time.perf_counter()
            model_dir = build_model(shape, tok, work / shape)
            print(f"\n{shape}: built in {time.perf_counter() - t:.0f}s; {n_new} new tokens per reply")
            for name in args.backends:
                if name == "pytorch":
                    backend = load_backend(model_dir, device="cpu", n_threads=args.threads)
                else:
                    from export.gguf import export_gguf

                    gguf_dir = work / f"{shape}-gguf"
                    gguf_dir.mkdir(exist_ok=True)
                    gguf = gguf_dir / f"{shape}-f32.gguf"
                    if not gguf.exists():
                        export_gguf(model_dir, gguf, quant="f32", progress=False)
                    shutil.copy(model_dir / "tokenizer.model", gguf_dir / "tokenizer.model")
                    backend = load_backend(gguf, n_threads=args.threads)
                bench_direct(backend, messages, n_new, 1)  # warm-up
                rows = {"direct": bench_direct(backend, messages, n_new, args.runs),
                        "app": bench_app(backend, messages, n_new, args.runs)}
                if name == "llama.cpp":
                    rows["llama.cpp native"] = bench_llama_native(backend, prompt_ids, n_new, args.runs)
                for path, r in rows.items():
                    results.append({"shape": shape, "backend": name, "path": path, **r})
                ref = rows["direct"]
                for path, r in rows.items():
                    ratio = r["tokens_per_s"] / ref["tokens_per_s"]
                    print(f"  {name:9s} {path:17s} TTFT {r['ttft_ms']:8.1f} ms   {r['tokens_per_s']:8.2f} tokens/s"
                          f"   ({ratio:.2f}x direct tokens/s)")
                if name == "llama.cpp":
                    native = rows["llama.cpp native"]["tokens_per_s"]
                    print(f"  llama.cpp backend / native llama.cpp loop: {ref['tokens_per_s'] / native:.2f}x tokens/s")
                del backend
                gc.collect()
            if not args.keep:
                shutil.rmtree(model_dir, ignore_errors=True)
        pt = {(r["shape"], r["path"]): r for r in results if r["backend"] == "pytorch"}
        for r in results:
            if r["backend"] == "llama.cpp" and (r["shape"], r["path"]) in pt:
                base = pt[(r["shape"], r["path"])]
                print(f"{r['shape']} {r['path']}: llama.cpp / pytorch = "
                      f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                      f"TTFT {r['ttft_ms'] / base['ttft_ms']:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
