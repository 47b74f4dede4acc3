"""Export a RODIN model as a Hugging Face `LlamaForCausalLM` directory.

    python -m export.hf --model runs/rodin-1b/final --out exports/rodin-1b-hf

The directory loads with `AutoModelForCausalLM` / `AutoTokenizer` and no custom code, and is
ready for `huggingface-cli upload`:

    config.json              LlamaForCausalLM config (rodin.checkpoint.to_hf_config)
    model.safetensors        HF tensor names, bf16 by default (--dtype); tied lm_head not stored
    generation_config.json   bos/eos/pad (+ <|im_end|> as a stop and sampling defaults for chat models)
    tokenizer.model          the SentencePiece model, unchanged
    tokenizer.json           fast tokenizer converted by transformers' own SentencePiece converter,
                             checked here to give SentencePiece's ids
    tokenizer_config.json    add_bos, special tokens, the ChatML chat_template for chat models
    README.md                model card with hub metadata (language fr, license, base model, datasets)

The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from rodin.chat import IM_END, IM_START
from rodin.checkpoint import replace_dir, temp_dir_beside, to_hf_config, to_hf_name
from rodin.tokenizer import Tokenizer
from export.source import ModelSource, open_source

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_LICENSE = "apache-2.0"

# Texts the converted fast tokenizer must encode exactly like SentencePiece before it is written.
TOKENIZER_CHECK_TEXTS = (
    "Bonjour, je m'appelle Rodin. Où se trouve la gare ?",
    "Déjà vu à Noël : « ça » coûte 3,14 € ! 🎉🇫🇷",
    "deux  espaces,   trois\tune tabulation\net une nouvelle ligne\n\n",
    " espace initial, chiffres 2024-11-26 et 12345678",
    f"{IM_START}system\nTu es un assistant.{IM_END}\n{IM_START}user\nSalut !{IM_END}\n{IM_START}assistant\n",
    "Œuvres de Molière — « L'Avare » (1668) ; 漢字 hors vocabulaire.",
)


# ----------------------------------------------------------------------------- tokenizer


def _sp_proto(tok: Tokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    return proto


def fast_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece model (transformers' converter).

    `legacy=True` is the converter mode that reproduces SentencePiece's dummy prefix exactly
    (also before a leading space); it changes nothing for tokenizers without the prefix.
    """
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _sp_proto(tok)
    if proto.trainer_spec.model_type != 2:
        raise ValueError(f"{tok.path}: only BPE SentencePiece models are supported (model_type "
                         f"{proto.trainer_spec.model_type})")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)


def check_fast_tokenizer(tok: Tokenizer, fast, texts=TOKENIZER_CHECK_TEXTS) -> None:
    """Raise if the fast tokenizer's ids differ from SentencePiece's on any of `texts`."""
    for text in texts:
        want, got = tok.encode(text), fast.encode(text, add_special_tokens=False).ids
        if want != got:
            raise RuntimeError(f"the converted fast tokenizer disagrees with SentencePiece ({tok.path}) on {text!r}: "
                               f"{got[:16]} vs {want[:16]}; please report this with the tokenizer file")


def write_tokenizer_files(tok: Tokenizer, out: Path, *, chat_template: str | None, context_length: int) -> None:
    """tokenizer.model, tokenizer.json and tokenizer_config.json for a Llama-style HF directory."""
    from transformers import PreTrainedTokenizerFast

    fast = fast_tokenizer(tok)
    check_fast_tokenizer(tok, fast)
    sp = tok.sp
    special = {"bos_token": sp.IdToPiece(tok.bos_id), "eos_token": sp.IdToPiece(tok.eos_id),
               "unk_token": sp.IdToPiece(tok.unk_id)}
    if tok.pad_id >= 0:
        special["pad_token"] = sp.IdToPiece(tok.pad_id)
    extra = list((IM_START, IM_END)) if tok.has_atomic_chatml else []
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=fast, add_bos_token=True, add_eos_token=False,
                                     clean_up_tokenization_spaces=False, model_max_length=context_length,
                                     extra_special_tokens=extra, **special)
    hf_tok.save_pretrained(out)
    # Ids must not move: the added special tokens are the SentencePiece pieces themselves.
    for piece in list(special.values()) + extra:
        if hf_tok.convert_tokens_to_ids(piece) != sp.PieceToId(piece):
            raise RuntimeError(f"special token {piece!r} got id {hf_tok.convert_tokens_to_ids(piece)} in the fast "
                               f"tokenizer, {sp.PieceToId(piece)} in SentencePiece")
    shutil.copyfile(tok.path, out / "tokenizer.model")
    # Written explicitly: the class that reads tokenizer.json as is in transformers 4.x and 5.x
    # (LlamaTokenizer would rebuild its own pre-tokenizer and break id parity).
    added = {}
    for i in sorted({tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id} - {-1}) + [sp.PieceToId(p) for p in extra]:
        added[str(i)] = {"content": sp.IdToPiece(i), "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "legacy": True,
    }
    if extra:
        config["additional_special_tokens"] = extra
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    stm = out / "special_tokens_map.json"
    if stm.exists():
        stm.unlink()
    (out / "special_tokens_map.json").write_text(json.dumps(
        {**special, **({"additional_special_tokens": extra} if extra else {})}, indent=2) + "\n")


# ----------------------------------------------------------------------------- model card


def model_card(*, name: str, cfg, is_chat: bool, license: str, base_model: str | None, datasets: list[str],
               dtype: str, repo_id: str | None) -> str:
    """README.md with the hub's YAML metadata."""
    lines = ["---", "language:", "- fr", f"license: {license}", "library_name: transformers",
             "pipeline_tag: text-generation", "tags:", "- rodin", "- llama", "- french"]
    if is_chat:
        lines += ["- chatml", "- conversational"]
    if base_model:
        lines += ["base_model:", f"- {base_model}"]
    if datasets:
        lines += ["datasets:"] + [f"- {d}" for d in datasets]
    lines.append("---")
    repo = repo_id or f"<owner>/{name}"
    kind = "conversational (ChatML) model" if is_chat else "base model (raw text completion)"
    params = cfg.num_parameters()
    body = f"""
# {name}

{name} is a French-only LLaMA-style {kind} of the RODIN family, trained from scratch on French text.
It loads with `transformers` alone (`LlamaForCausalLM`, no custom code).

| | |
|---|---|
| parameters | {params:,} (tied embeddings counted once) |
| layers / hidden / heads (KV) | {cfg.n_layers} / {cfg.dim} / {cfg.n_heads} ({cfg.n_kv_heads}) |
| FFN (SwiGLU) | {cfg.ffn_dim} |
| vocabulary | {cfg.vocab_size:,} (SentencePiece BPE, byte fallback) |
| context | {cfg.context_length} tokens |
| weights | {dtype} safetensors |

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}")
"""
    if is_chat:
        body += """messages = [{"role": "user", "content": "Quelle est la capitale de la France ?"}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
out = model.generate(ids, max_new_tokens=128, do_sample=True, temperature=0.7, top_p=0.9)
print(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
```

The chat format is ChatML (`<|im_start|>role ... <|im_end|>`); generation stops at `<|im_end|>`.
"""
    else:
        body += """ids = tok("La Révolution française a commencé en", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=64)
print(tok.decode(out[0], skip_special_tokens=True))
```
"""
    body += """
## Limitations

A small model trained on French text only: it makes factual errors, knows little outside French-language
sources and is not aligned for safety beyond its training data. Verify what it says.
"""
    return "\n".join(lines) + "\n" + body


# ----------------------------------------------------------------------------- export


def hf_state_dict(src: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors in `dtype` (tied lm_head left out: transformers re-ties it)."""
    return {to_hf_name(name): src.get(name).to(dtype).contiguous() for name in src.shapes}


def export_hf(model: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
              tokenizer: str | os.PathLike | None = None, chat: bool | None = None, name: str | None = None,
              license: str | None = None, base_model: str | None = None, datasets: list[str] | None = None,
              repo_id: str | None = None) -> Path:
    """Write the HF directory for `model` (our dir, HF dir or .pt) to `out`; returns `out`.

    chat None follows the source (a chat template was saved with it); True/False forces it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    with open_source(model) as src:
        info, cfg = src.info, src.cfg
        tok_path = Path(tokenizer) if tokenizer else info.tokenizer_path
        if tok_path is None:
            raise FileNotFoundError(f"{info.path}: no tokenizer.model next to the weights; pass --tokenizer PATH")
        tok = Tokenizer(tok_path)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer {tok.path} has {tok.vocab_size} pieces but the model's embedding only "
                             f"{cfg.vocab_size} rows; they do not belong together")
        is_chat = info.is_chat if chat is None else chat
        template = None
        if is_chat:
            from rodin.chat import jinja_template

            template = info.chat_template or jinja_template()
        meta = info.metadata or {}
        name = name or meta.get("name") or cfg.name
        tmp = temp_dir_beside(out)
        try:
            sd = hf_state_dict(src, DTYPES[dtype])
            save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
            del sd
            hf_cfg = to_hf_config(cfg, torch_dtype=dtype, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                  pad_id=max(tok.pad_id, 0))
            hf_cfg["dtype"] = dtype  # transformers 5 name of torch_dtype
            hf_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
            gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": max(tok.pad_id, 0)}
            if is_chat:
                if tok.has_atomic_chatml:
                    gen["eos_token_id"] = [tok.eos_id, tok.piece_to_id(IM_END)]
                gen.update(do_sample=True, temperature=0.7, top_p=0.9)
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            write_tokenizer_files(tok, tmp, chat_template=template, context_length=cfg.context_length)
            card = model_card(name=name, cfg=cfg, is_chat=is_chat, license=license or meta.get("license") or
                              DEFAULT_LICENSE, base_model=base_model or meta.get("base_model"),
                              datasets=datasets if datasets is not None else list(meta.get("datasets") or []),
                              dtype=dtype, repo_id=repo_id)
            (tmp / "README.md").write_text(card)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export.hf", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m export.hf --model runs/sft/final --out exports/rodin-1b-instruct-hf \\\n"
               "      --license apache-2.0 --base-model rodin-llm/rodin-1b --dataset HPLT/HPLT2.0_cleaned\n"
               "  huggingface-cli upload <owner>/rodin-1b-instruct exports/rodin-1b-instruct-hf")
    p.add_argument("--model", required=True, help="our model directory, an HF Llama directory or a .pt checkpoint")
    p.add_argument("--out", required=True, help="output directory (replaced atomically if it exists)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="weight dtype (default bfloat16)")
    p.add_argument("--tokenizer", help="tokenizer.model to use when the source has none next to it")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="write the ChatML chat_template (default: when the source is a chat model)")
    chat.add_argument("--base", dest="chat", action="store_false", help="no chat template (raw completion model)")
    p.add_argument("--name", help="model name for the card (default: the config's name)")
    p.add_argument("--license", help=f"hub license id (default: from the model metadata, else {DEFAULT_LICENSE})")
    p.add_argument("--base-model", help="hub id of the model this one was fine-tuned from (card metadata)")
    p.add_argument("--dataset", action="append", dest="datasets", help="hub dataset id for the card (repeatable)")
    p.add_argument("--repo-id", help="hub repository the card's usage example points to")
    a = p.parse_args(argv)
    try:
        out = export_hf(a.model, a.out, dtype=a.dtype, tokenizer=a.tokenizer, chat=a.chat, name=a.name,
                        license=a.license, base_model=a.base_model, datasets=a.datasets, repo_id=a.repo_id)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
