import jinja2
import pytest

from rodin import chat
from rodin.model import IGNORE_INDEX

CONV = [
    {"role": "system", "content": "Tu es un assistant."},
    {"role": "user", "content": "Quelle est la capitale de la France ?"},
    {"role": "assistant", "content": "Paris, bien sûr."},
    {"role": "user", "content": "Et de l'Italie ? 🇮🇹"},
    {"role": "assistant", "content": "Rome.\nC'est tout."},
]


def test_render_is_chatml():
    assert chat.render(CONV[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nTu es un assistant.<|im_end|>\n"
        "<|im_start|>user\nQuelle est la capitale de la France ?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_jinja_template_renders_like_render():
    template = jinja2.Template(chat.jinja_template())
    for gen in (False, True):
        assert template.render(messages=CONV, add_generation_prompt=gen) == chat.render(CONV, gen)


def test_jinja_template_is_the_string_llama_cpp_python_recognises():
    from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE

    assert chat.jinja_template() == CHATML_CHAT_TEMPLATE


def test_ollama_template_contains_the_same_markers():
    t = chat.ollama_template()
    assert t.endswith("<|im_start|>assistant\n") and "{{ .Content }}<|im_end|>\n" in t


def _assistant_text(tokenizer, ids, labels):
    """Decode the labelled tokens, run by run (each run is one assistant reply)."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    runs += [cur] if cur else []
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("kind", ["tokenizer", "text_marker_tokenizer"])
def test_loss_mask_marks_exactly_the_assistant_tokens(kind, request):
    tok = request.getfixturevalue(kind)
    ids, labels = chat.encode_conversation(tok, CONV)
    assert ids == tok.encode(chat.render(CONV), bos=True)  # one-string tokenization, as at inference
    assert len(labels) == len(ids) and labels[0] == IGNORE_INDEX
    # token by token: every trained token lies in an assistant reply + its end marker, all of them are trained
    text = chat.render(CONV).encode()
    _, spans = tok.encode_with_offsets(chat.render(CONV), bos=True)
    replies = [(text.index(f"{m['content']}<|im_end|>".encode()), m) for m in CONV if m["role"] == "assistant"]
    regions = [(s, s + len(f"{m['content']}<|im_end|>".encode())) for s, m in replies]
    for (b, e), lab in zip(spans, labels):
        inside = any(lo <= b and e <= hi for lo, hi in regions)
        outside = all(e <= lo or b >= hi for lo, hi in regions)
        assert inside or outside, "a token straddles a reply boundary"
        assert (lab != IGNORE_INDEX) == inside
    assert _assistant_text(tok, ids, labels) == ["Paris, bien sûr.<|im_end|>", "Rome.\nC'est tout.<|im_end|>"]


def test_atomic_end_marker_is_one_trained_token(tokenizer):
    ids, labels = chat.encode_conversation(tokenizer, CONV)
    end = tokenizer.piece_to_id("<|im_end|>")
    trained_ends = [i for i, lab in zip(ids, labels) if lab == end]
    assert len(trained_ends) == 2 and ids.count(end) == 5


def test_prompt_ends_with_assistant_header(tokenizer):
    ids = chat.encode_prompt(tokenizer, CONV[:2])
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert chat.stop_token_ids(tokenizer) == [3, tokenizer.piece_to_id("<|im_end|>"), tokenizer.piece_to_id("<|im_start|>")]


@pytest.mark.parametrize("bad, match", [
    ([], "at least one"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": 3}], "string 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
])
def test_validation_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        chat.validate(bad)


def test_fit_to_context_drops_oldest_turns_keeps_system_and_newest(tokenizer):
    long_conv = [CONV[0]] + [m for _ in range(6) for m in CONV[1:3]] + [CONV[3]]
    full = len(chat.encode_prompt(tokenizer, long_conv))
    kept, dropped = chat.fit_to_context(tokenizer, long_conv, full - 1)
    assert dropped == 2 and kept[0] == CONV[0] and kept[-1] == CONV[3] and kept[1]["role"] == "user"
    assert len(chat.encode_prompt(tokenizer, kept)) <= full - 1
    kept, dropped = chat.fit_to_context(tokenizer, long_conv, full)
    assert dropped == 0 and kept == long_conv
    with pytest.raises(ValueError, match="last message alone"):
        chat.fit_to_context(tokenizer, long_conv, 10)


def test_parse_is_the_inverse_of_render():
    assert chat.parse(chat.render(CONV)) == CONV
    assert chat.parse("<s>" + chat.render(CONV[1:3])) == CONV[1:3]


@pytest.mark.parametrize("bad, match", [
    ("bonjour<|im_start|>user\nhi<|im_end|>\n", "outside a ChatML turn"),
    ("<|im_start|>user\nhi", "unterminated turn"),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "unterminated turn"),
    ("<|im_start|>user\nhi<|im_start|>assistant\nyo<|im_end|>\n", "not closed"),
    ("du texte sans balises", "outside|after the last turn|no ChatML turn"),
])
def test_parse_rejects_malformed_text(bad, match):
    with pytest.raises(ValueError, match=match):
        chat.parse(bad)
