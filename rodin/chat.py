"""ChatML, defined once.

Everything that needs the chat format derives it from here: SFT token ids and loss masks,
the Jinja `chat_template` written into HF and GGUF exports, the Ollama TEMPLATE, the stop
strings, and the prompts of the demo and the CLI. Works whether the markers are atomic
tokens (tokenizers trained by this project) or plain text (the released RODIN tokenizer):
conversations are always tokenized as one string and the loss mask comes from byte spans.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rodin.model import IGNORE_INDEX
from rodin.tokenizer import Tokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")
STOP_STRINGS = (IM_END, IM_START)
DEFAULT_SYSTEM_PROMPT = "Tu es RODIN, un assistant francophone serviable, précis et concis."

Message = dict  # {"role": one of ROLES, "content": str}


def _turn_header(role: str) -> str:
    return f"{IM_START}{role}\n"


def _turn_footer() -> str:
    return f"{IM_END}\n"


def validate(messages: Sequence[Message]) -> None:
    """Raise ValueError naming the first malformed message."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; expected one of {ROLES}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")


def render(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation, optionally followed by the assistant header."""
    text = "".join(_turn_header(m["role"]) + m["content"] + _turn_footer() for m in messages)
    return text + (_turn_header("assistant") if add_generation_prompt else "")


_TURN_RE = re.compile(re.escape(IM_START) + r"([^\n]*)\n(.*?)" + re.escape(IM_END) + r"\n?", re.DOTALL)


def parse(text: str) -> list[Message]:
    """Messages of a rendered ChatML conversation: the inverse of `render` (without a
    trailing generation prompt). Raises ValueError on stray text between turns, an
    unterminated turn or a trailing generation prompt.
    """
    if text.startswith("<s>"):  # some dumps keep the BOS piece; encoding adds its own
        text = text[3:]
    messages, pos = [], 0
    for m in _TURN_RE.finditer(text):
        stray = text[pos:m.start()]
        if stray.strip():
            raise ValueError(f"text outside a ChatML turn at character {pos}: {stray[:40]!r}")
        role, content = m.group(1), m.group(2)
        if IM_START in content:
            raise ValueError(f"turn {len(messages)} ({role!r}) is not closed by {IM_END} before the next {IM_START}")
        messages.append({"role": role, "content": content})
        pos = m.end()
    rest = text[pos:]
    if rest.strip():
        what = "an unterminated turn" if IM_START in rest else "text after the last turn"
        raise ValueError(f"{what} at character {pos}: {rest[:40]!r}")
    if not messages:
        raise ValueError(f"no ChatML turn found ({IM_START}role\\n...{IM_END})")
    return messages


def _trained_spans(messages: Sequence[Message]) -> list[tuple[int, int]]:
    """UTF-8 byte ranges of the rendered text that carry loss: assistant content + its IM_END."""
    spans, pos = [], 0
    for m in messages:
        header, body = _turn_header(m["role"]).encode(), (m["content"] + IM_END).encode()
        start = pos + len(header)
        if m["role"] == "assistant":
            spans.append((start, start + len(body)))
        pos = start + len(body) + len(b"\n")
    return spans


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Message], bos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels: IGNORE_INDEX except on assistant tokens.

    A token is trained when its byte span overlaps an assistant reply (content and the
    closing marker), so pieces that straddle a boundary are never silently dropped.
    """
    validate(messages)
    ids, offsets = tokenizer.encode_with_offsets(render(messages), bos=bos)
    spans = _trained_spans(messages)
    labels = []
    for tok, (b, e) in zip(ids, offsets):
        trained = e > b and any(b < hi and e > lo for lo, hi in spans)
        labels.append(tok if trained else IGNORE_INDEX)
    return ids, labels


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[Message], bos: bool = True) -> list[int]:
    """Ids of a conversation followed by the assistant header, ready for generation."""
    validate(messages)
    return tokenizer.encode(render(messages, add_generation_prompt=True), bos=bos)


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """EOS plus the markers when they are atomic tokens (otherwise they stop as strings)."""
    ids = [tokenizer.eos_id]
    if tokenizer.has_atomic_chatml:
        ids += [tokenizer.piece_to_id(s) for s in STOP_STRINGS]
    return ids


def fit_to_context(tokenizer: Tokenizer, messages: Sequence[Message], max_prompt_tokens: int) -> tuple[list[Message], int]:
    """Drop the oldest turns (keeping a leading system prompt and the newest message) until the
    prompt fits in `max_prompt_tokens`. Returns (messages kept, number of messages dropped).

    Raises ValueError if even the system prompt plus the newest message do not fit: the
    newest message is never silently truncated.
    """
    msgs = list(messages)
    system = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    rest = msgs[len(system):]
    dropped = 0
    while len(encode_prompt(tokenizer, system + rest)) > max_prompt_tokens:
        if len(rest) <= 1:
            raise ValueError(
                f"the last message alone needs {len(encode_prompt(tokenizer, system + rest))} tokens, "
                f"more than the {max_prompt_tokens} available; shorten it or lower max new tokens")
        # Drop whole exchanges so the history never starts with an assistant turn.
        n = 2 if len(rest) > 2 and rest[0]["role"] == "user" and rest[1]["role"] == "assistant" else 1
        rest, dropped = rest[n:], dropped + n
    return system + rest, dropped


def jinja_template() -> str:
    """The HF / GGUF `chat_template`: the OpenHermes ChatML string, with real newlines inside
    its string literals, that llama-cpp-python and Ollama recognise verbatim."""
    return (
        "{% for message in messages %}"
        f"{{{{'{IM_START}' + message['role'] + '\n' + message['content'] + '{IM_END}' + '\n'}}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{IM_START}assistant\n' }}}}{{% endif %}}"
    )


def ollama_template() -> str:
    """The Ollama Modelfile TEMPLATE (Go template syntax)."""
    return (
        f"{{{{- if .System }}}}{IM_START}system\n{{{{ .System }}}}{IM_END}\n{{{{ end }}}}"
        f"{{{{- range .Messages }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}{IM_END}\n{{{{ end }}}}"
        f"{IM_START}assistant\n"
    )
