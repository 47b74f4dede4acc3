import pytest

from rodin.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from tests.fixtures import FRENCH_TEXTS, TRICKY_TEXTS


@pytest.mark.parametrize("text", FRENCH_TEXTS + TRICKY_TEXTS)
def test_round_trip_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_with_dummy_prefix_tokenizer(text_marker_tokenizer):
    for text in TRICKY_TEXTS:
        if not text.startswith(" "):  # SentencePiece strips the dummy space it added, nothing more
            assert text_marker_tokenizer.decode(text_marker_tokenizer.encode(text)) == text


def test_special_ids_and_training_options(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tokenizer.vocab_size == 512
    assert not tokenizer.add_dummy_prefix
    ids = tokenizer.encode("Prix : 2024 €", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    # split digits: every digit is its own piece
    assert [p for p in (tokenizer.id_to_piece(i) for i in ids) if any(c.isdigit() for c in p)] == ["2", "0", "2", "4"]
    # byte fallback: a character never seen in training becomes its UTF-8 bytes, not <unk>
    assert UNK_ID not in tokenizer.encode("漢") and len(tokenizer.encode("漢")) == 3


def test_identity_normalization_keeps_spaces(tokenizer):
    one, two = tokenizer.encode("a b"), tokenizer.encode("a  b")
    assert one != two and tokenizer.decode(two) == "a  b"


def test_chatml_markers_are_atomic_when_trained_here(tokenizer):
    assert tokenizer.has_atomic_chatml
    ids = tokenizer.encode("<|im_start|>user\nBonjour<|im_end|>")
    assert ids[0] == tokenizer.piece_to_id("<|im_start|>")
    assert tokenizer.piece_to_id("<|im_end|>") in ids


def test_released_style_tokenizer_keeps_markers_as_text(text_marker_tokenizer):
    tok = text_marker_tokenizer
    assert not tok.has_atomic_chatml and tok.add_dummy_prefix
    assert len(tok.encode("<|im_start|>")) > 1


def test_batch_encode_equals_single(tokenizer):
    assert tokenizer.encode_batch(FRENCH_TEXTS, bos=True) == [tokenizer.encode(t, bos=True) for t in FRENCH_TEXTS]


def test_offsets_cover_the_text(tokenizer):
    text = "Déjà 🎉 vu"
    ids, spans = tokenizer.encode_with_offsets(text, bos=True)
    assert len(ids) == len(spans) and spans[0] == (0, 0)
    assert max(e for _, e in spans) == len(text.encode())


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer(tmp_path)
