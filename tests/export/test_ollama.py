"""export.ollama: Modelfiles for chat and base GGUFs."""

from __future__ import annotations

import pytest

from export.gguf import export_gguf
from export.ollama import main, modelfile_text, write_modelfile
from rodin.chat import ollama_template


@pytest.fixture(scope="module")
def ggufs(model_dir, chat_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ollama")
    return {"base": export_gguf(model_dir, d / "base" / "base-Q8_0.gguf", quant="q8_0", progress=False),
            "chat": export_gguf(chat_model_dir, d / "chat-Q8_0.gguf", quant="q8_0", progress=False)}


def parse(text: str) -> tuple[dict, list[tuple[str, str]]]:
    """Minimal Modelfile parser: instructions with triple-quoted values, and the PARAMETER list."""
    out, params, rest = {}, [], text
    while rest.strip():
        rest = rest.lstrip("\n")
        word, _, rest = rest.partition(" ")
        if rest.startswith('"""'):
            value, _, rest = rest[3:].partition('"""')
            rest = rest.partition("\n")[2]
        else:
            value, _, rest = rest.partition("\n")
        if word == "PARAMETER":
            k, _, v = value.partition(" ")
            params.append((k, v))
        else:
            out[word] = value
    return out, params


def test_chat_modelfile(ggufs):
    path = write_modelfile(ggufs["chat"])
    assert path == ggufs["chat"].parent / "Modelfile"
    inst, params = parse(path.read_text())
    assert inst["FROM"] == "./chat-Q8_0.gguf" and (path.parent / inst["FROM"]).is_file()
    assert inst["TEMPLATE"] == ollama_template() and "SYSTEM" not in inst
    assert params == [("stop", '"<|im_end|>"'), ("stop", '"<|im_start|>"'), ("temperature", "0.7"),
                      ("top_p", "0.9"), ("num_ctx", "256")]


def test_base_modelfile_and_relative_from(ggufs, tmp_path):
    out = write_modelfile(ggufs["base"], tmp_path / "Modelfile")
    inst, params = parse(out.read_text())
    assert inst["TEMPLATE"] == "{{ .Prompt }}" and params == [("num_ctx", "256")]
    assert (out.parent / inst["FROM"]).resolve() == ggufs["base"].resolve()


def test_cli_flags_and_errors(ggufs, tmp_path, capsys):
    out = tmp_path / "M"
    assert main(["--gguf", str(ggufs["base"]), "--out", str(out), "--chat", "--system", "Réponds en français.",
                 "--num-ctx", "128"]) == 0
    inst, params = parse(out.read_text())
    assert inst["SYSTEM"] == "Réponds en français." and ("num_ctx", "128") in params
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    assert main(["--gguf", str(bad), "--out", str(tmp_path / "M2")]) == 1
    assert "not a readable GGUF" in capsys.readouterr().err and not (tmp_path / "M2").exists()
    with pytest.raises(ValueError):
        modelfile_text("./x.gguf", chat=True, system='a """ b')
