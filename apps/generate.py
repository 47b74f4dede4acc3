"""Chat or completion in the terminal, streamed to stdout: the demo's backends without a browser.

    python -m apps.generate --model runs/sft/final "Quelle est la capitale de la France ?"
    python -m apps.generate --model rodin-1b-f32.gguf --mode completion "Il était une fois"
    python -m apps.generate --model runs/sft/final --interactive      # multi-turn REPL

One prompt on the command line (or `-` for stdin) gives one chat turn or one completion and
exits; with no prompt on a terminal, or `--interactive`, it reads prompts line by line and
keeps the conversation (`/reset` forgets it, `/quit` or Ctrl-D leaves). The mode follows the
model (chat if it carries a ChatML template) unless `--mode` says otherwise. Statistics
(tokens, tokens/s, why it stopped) go to stderr with `--stats`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from apps.backends import MODES, Backend, load_backend, resolve_mode, sampling_config, start_chat, start_completion
from rodin.chat import DEFAULT_SYSTEM_PROMPT

CONTEXT_NOTICE = "[Les plus anciens messages ont été retirés du contexte.]"


def _print_stream(reply, out, stats: bool) -> str:
    t0 = time.perf_counter()
    first = None
    for chunk in reply:
        if first is None:
            first = time.perf_counter()
        out.write(chunk)
        out.flush()
    out.write("\n")
    out.flush()
    res = reply.result
    if stats:
        dt = time.perf_counter() - (first or t0)
        n = len(res.token_ids)
        rate = (n - 1) / dt if n > 1 and dt > 0 else float("nan")
        print(f"[{n} tokens, first after {(first or t0) - t0:.3f}s, {rate:.1f} tokens/s, "
              f"stopped: {res.finish_reason}]", file=sys.stderr)
    return reply.text


class Session:
    """One conversation (chat) or a series of completions on a backend."""

    def __init__(self, backend: Backend, mode: str, system_prompt: str, max_new_tokens: int, sampling, stats: bool):
        self.backend, self.mode, self.system_prompt = backend, mode, system_prompt
        self.max_new_tokens, self.sampling, self.stats = max_new_tokens, sampling, stats
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, out=None) -> str:
        out = out or sys.stdout
        if self.mode == "completion":
            reply = start_completion(self.backend, text, self.max_new_tokens, self.sampling)
            answer = _print_stream(reply, out, self.stats)
            if reply.result.truncated_prompt_tokens:
                print(f"[{reply.result.truncated_prompt_tokens} prompt tokens dropped to fit the context]",
                      file=sys.stderr)
            return answer
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages = system + self.history + [{"role": "user", "content": text}]
        turn = start_chat(self.backend, messages, self.max_new_tokens, self.sampling)
        if turn.dropped:
            print(CONTEXT_NOTICE, file=sys.stderr)
        answer = _print_stream(turn.reply, out, self.stats)
        kept = turn.messages[len(system):]
        self.history = kept + [{"role": "assistant", "content": answer}]
        return answer


def repl(session: Session) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{session.backend.describe()}, mode {session.mode}. /reset pour oublier la conversation, "
              f"/quit pour quitter.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("[conversation oubliée]", file=sys.stderr)
            continue
        try:
            session.ask(line)
        except ValueError as e:  # the message alone does not fit the context
            print(f"error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m apps.generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               '  python -m apps.generate --model runs/sft/final "Bonjour, qui es-tu ?"\n'
               '  python -m apps.generate --model rodin-1b-q4_k_m.gguf --temperature 0.7 --top-p 0.9 -i\n'
               '  echo "Il était une fois" | python -m apps.generate --model runs/base --mode completion -')
    p.add_argument("prompt", nargs="?", help="message or text to continue; '-' reads stdin; none = interactive")
    p.add_argument("--model", required=True, help="rodin/HF model directory, upstream .pt, hub id or .gguf file")
    p.add_argument("--mode", choices=MODES, default="auto", help="chat, completion or auto (from the model; default)")
    p.add_argument("-i", "--interactive", action="store_true", help="read prompts line by line (multi-turn chat)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="chat system prompt ('' for none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=-1, help="sampling seed (-1 = random)")
    p.add_argument("--device", default="auto", help="PyTorch backend: cpu, cuda... (default: cuda if available)")
    p.add_argument("--n-ctx", type=int, default=0, help="GGUF backend: context size (0 = the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for either backend (default: PyTorch's and llama.cpp's own defaults)")
    p.add_argument("--stats", action="store_true", help="print tokens, time to first token and tokens/s to stderr")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    backend = load_backend(args.model, device=args.device, n_ctx=args.n_ctx, n_threads=args.threads)
    session = Session(backend, resolve_mode(args.mode, backend), args.system_prompt, args.max_new_tokens,
                      sampling_config(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed),
                      args.stats)
    if args.interactive or (args.prompt is None and sys.stdin.isatty()):
        repl(session)
        return 0
    text = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    if session.mode == "chat":
        text = text.strip()
    if not text:
        p.error("empty prompt")
    try:
        session.ask(text)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
