"""SentencePiece tokenizer: the wrapper every tool uses, and `train_tokenizer`.

Tokenizers trained here are BPE with byte fallback, split digits, *identity* normalization
without whitespace collapsing and no dummy prefix, so llama.cpp's SPM tokenizer (which
applies no normalization) produces the same ids, chat markers included. The ChatML markers are atomic user-defined symbols.
The released RODIN tokenizer, where the markers are plain text, loads as well:
`has_atomic_chatml` tells the two apart.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHATML_SYMBOLS = ("<|im_start|>", "<|im_end|>")
TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected a SentencePiece '{TOKENIZER_FILE}')")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with terse texts
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id(), self.sp.unk_id()
        self.has_atomic_chatml = all(self.sp.PieceToId(s) != self.unk_id for s in CHATML_SYMBOLS)
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return self._sha256

    @property
    def add_dummy_prefix(self) -> bool:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        return proto.normalizer_spec.add_dummy_prefix

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.Encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int = -1) -> list[list[int]]:
        return self.sp.Encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def encode_with_offsets(self, text: str, bos: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the UTF-8 byte span (begin, end) of `text` that each id covers."""
        pieces = self.sp.Encode(text, out_type="proto").pieces
        ids = [p.id for p in pieces]
        spans = [(p.begin, p.end) for p in pieces]
        if bos:
            ids, spans = [self.bos_id] + ids, [(0, 0)] + spans
        return ids, spans

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.Decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(i)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, atomic_chatml={self.has_atomic_chatml})"


def _documents_as_sentences(texts: Iterable[str], max_chars: int = 2000) -> Iterator[str]:
    # SentencePiece trains on bounded "sentences". Groups of whole lines, newlines kept,
    # so that "\n" is learned as a character instead of falling back to a byte.
    for text in texts:
        chunk: list[str] = []
        size = 0
        for line in text.split("\n"):
            if chunk and size + len(line) > max_chars:
                yield "\n".join(chunk)
                chunk, size = [], 0
            chunk.append(line[: 4 * max_chars])
            size += len(line) + 1
        if chunk and "".join(chunk).strip():
            yield "\n".join(chunk)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 64000, *,
                    input_sentence_size: int = 2_000_000, num_threads: int | None = None,
                    character_coverage: float = 0.9999, max_sentence_length: int = 16384,
                    atomic_chatml: bool = True, add_dummy_prefix: bool = False) -> Path:
    """Train a RODIN tokenizer on an iterable of documents; returns `out_dir/tokenizer.model`.

    `atomic_chatml=False` leaves the ChatML markers as plain text, like the released
    RODIN tokenizer (useful to test that path).

    `add_dummy_prefix` defaults to False, unlike the released tokenizer: llama.cpp inserts
    the dummy space before every text fragment that follows a special token, SentencePiece
    only at the start of the text, so with atomic ChatML markers the two disagree on every
    turn header ("<|im_start|>", "▁user" against "<|im_start|>", "user"). Without the prefix,
    SentencePiece, llama.cpp and the HF fast tokenizer give identical ids everywhere.

    The file is written under a temporary prefix and renamed when complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_prefix = out_dir / ".tokenizer.tmp"
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_documents_as_sentences(texts),
        model_prefix=str(tmp_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=list(CHATML_SYMBOLS) if atomic_chatml else [],
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    final = out_dir / TOKENIZER_FILE
    os.replace(f"{tmp_prefix}.model", final)
    Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)
    return final
