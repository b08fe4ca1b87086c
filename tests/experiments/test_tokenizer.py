"""The character tokenizer: specials, encoding, padding side, and a save/load round trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hf_copilot.experiments.tokenizer import build_char_tokenizer


@pytest.fixture
def tokenizer():
    return build_char_tokenizer(["12+3=", "a b\n"])


def test_vocabulary_is_specials_then_sorted_characters(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == [
        "<pad>", "<s>", "</s>", "<unk>", "\n", " ", "+", "1", "2", "3", "=", "a", "b",
    ]  # fmt: skip
    specials = [
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    ]
    assert specials == [0, 1, 2, 3]


def test_encoding_is_one_token_per_character_after_bos(tokenizer):
    assert tokenizer("12+3=")["input_ids"] == [1, 7, 8, 6, 9, 10]
    assert tokenizer("12", add_special_tokens=False)["input_ids"] == [7, 8]
    assert tokenizer("a?b")["input_ids"] == [1, 11, 3, 12]  # unknown character -> <unk>
    assert tokenizer.decode(tokenizer("a b\n12")["input_ids"], skip_special_tokens=True) == "a b\n12"


def test_pads_on_the_left_for_generation(tokenizer):
    batch = tokenizer(["12", "1"], padding=True)
    assert batch["input_ids"] == [[1, 7, 8], [0, 1, 7]]
    assert batch["attention_mask"] == [[1, 1, 1], [0, 1, 1]]


def test_alphabet_adds_characters():
    assert len(build_char_tokenizer(alphabet="0123456789")) == 4 + 10
    assert len(build_char_tokenizer(["ab"], alphabet="bc")) == 4 + 3


def test_round_trip_through_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.padding_side == "left"
    texts = ["12+3=", "ab"]
    assert loaded(texts, padding=True)["input_ids"] == tokenizer(texts, padding=True)["input_ids"]
    assert loaded.decode(loaded("a b\n")["input_ids"], skip_special_tokens=True) == "a b\n"


def test_no_characters_is_an_error():
    with pytest.raises(ValueError, match="at least one character"):
        build_char_tokenizer([])
