"""Write an Ollama Modelfile for a RODIN GGUF.

    python -m export.ollama --gguf rodin-1b-instruct-Q4_K_M.gguf
    ollama create rodin -f Modelfile && ollama run rodin

Instruct (chat) models get the ChatML TEMPLATE derived from `rodin.chat`, the stops
`<|im_end|>` / `<|im_start|>`, temperature 0.7, top_p 0.9 and num_ctx = the training context;
base models get the raw completion template `{{ .Prompt }}`. Whether a GGUF is a chat model is
read from its `tokenizer.chat_template` unless --chat/--base says otherwise. LM Studio needs no
file: it takes the ChatML template embedded in the GGUF.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rodin.chat import STOP_STRINGS, ollama_template

CHAT_PARAMETERS = {"temperature": 0.7, "top_p": 0.9}


def gguf_info(path: str | os.PathLike) -> dict:
    """The few GGUF fields a Modelfile depends on: chat template and training context."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad files
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    return {"chat_template": field("tokenizer.chat_template"),
            "context_length": field(f"{arch}.context_length") if arch else None, "name": field("general.name")}


def modelfile_text(gguf_ref: str, *, chat: bool, num_ctx: int | None = None, system: str | None = None) -> str:
    """The Modelfile: FROM, TEMPLATE, PARAMETERs (and SYSTEM for chat models when given)."""
    def quoted(s: str) -> str:
        if '"""' in s:
            raise ValueError('a Modelfile value cannot contain """')
        return f'"""{s}"""'

    lines = [f"FROM {gguf_ref}", ""]
    if chat:
        lines.append(f"TEMPLATE {quoted(ollama_template())}")
        if system:
            lines.append(f"SYSTEM {quoted(system)}")
        for stop in STOP_STRINGS:
            lines.append(f'PARAMETER stop "{stop}"')
        for k, v in CHAT_PARAMETERS.items():
            lines.append(f"PARAMETER {k} {v}")
    else:
        lines.append(f"TEMPLATE {quoted('{{ .Prompt }}')}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, out: str | os.PathLike | None = None, *, chat: bool | None = None,
                    system: str | None = None, num_ctx: int | None = None) -> Path:
    """Write the Modelfile for `gguf_path` (default: `Modelfile` next to it); returns its path.

    FROM is the GGUF's path relative to the Modelfile's directory (Ollama resolves it there).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    info = gguf_info(gguf_path)
    is_chat = info["chat_template"] is not None if chat is None else chat
    out = Path(out) if out else gguf_path.parent / "Modelfile"
    ref = os.path.relpath(gguf_path.resolve(), out.parent.resolve())
    ref = ref if ref.startswith(".") else f"./{ref}"
    text = modelfile_text(ref, chat=is_chat, num_ctx=num_ctx or info["context_length"],
                          system=system if is_chat else None)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.ollama", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m export.ollama --gguf rodin-1b-instruct-Q4_K_M.gguf\n"
               "  ollama create rodin -f Modelfile && ollama run rodin")
    p.add_argument("--gguf", required=True, help="the GGUF file the Modelfile points to")
    p.add_argument("--out", help="Modelfile path (default: Modelfile next to the GGUF)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="ChatML template and chat parameters (default: if the GGUF has a chat template)")
    kind.add_argument("--base", dest="chat", action="store_false", help="raw completion template {{ .Prompt }}")
    p.add_argument("--system", help="default system prompt for chat models (default: none)")
    p.add_argument("--num-ctx", type=int, help="context window (default: the GGUF's training context)")
    a = p.parse_args(argv)
    try:
        out = write_modelfile(a.gguf, a.out, chat=a.chat, system=a.system, num_ctx=a.num_ctx)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}\nnext: ollama create <name> -f {out} && ollama run <name>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
