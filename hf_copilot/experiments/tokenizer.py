"""A character-level tokenizer for the offline tasks, as a standard `PreTrainedTokenizerFast`.

Characters keep the vocabulary tiny (16 tokens for arithmetic, 63 for the four offline tasks
together), which keeps the Copilot's V -> d_C input projection and V-sized output cheap, and make
every digit of an answer its own prediction, the unit the Mistake Log records errors on.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def build_char_tokenizer(texts: Iterable[str] = (), alphabet: str = "") -> PreTrainedTokenizerFast:
    """A tokenizer over the characters of `texts` and `alphabet` plus pad/bos/eos/unk (ids 0-3).

    Encoding prepends bos; unknown characters map to unk. Padding is on the left, as generation
    needs; the training collator pads on the right itself. Round-trips through `save_pretrained`
    and `AutoTokenizer.from_pretrained`.
    """
    characters = sorted(set(alphabet).union(*map(set, texts)))
    if not characters:
        raise ValueError("build_char_tokenizer needs at least one character: pass texts or an alphabet.")
    specials = [PAD, BOS, EOS, UNK]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    # BPE without merges splits a text into its characters, spaces and newlines included.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.add_special_tokens(specials)
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
