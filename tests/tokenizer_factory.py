"""A real ``transformers`` fast tokenizer, built offline in milliseconds.

No machine here can download a tokenizer, and the verl reward manager must be driven
by the real thing (``batch_decode`` with ``skip_special_tokens``, padding ids, special
tokens). So the tests build one with the ``tokenizers`` library: a WordPiece model over
a small vocabulary of arithmetic words and digits, digits split one per token (``##``
continuations, so ``"12"`` decodes back to ``"12"``), lowercased, wrapped in
``transformers.PreTrainedTokenizerFast`` with ``[PAD]``/``[BOS]``/``[EOS]``/``[UNK]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

_WORD_TEXT = (
    "what is plus minus times the answer so let me think step by first then add and "
    "equals compute sum of we get result final it a carry one ten hmm wait no yes "
    "question solve boxed"
)
WORDS = tuple(_WORD_TEXT.split())
PUNCTUATION = tuple(".,:;?!=+-*/{}\\$")
DIGITS = tuple("0123456789")


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens first (``[PAD]`` is 0), then words, punctuation, digits."""
    tokens: list[str] = [*SPECIAL_TOKENS, *WORDS, *PUNCTUATION, *DIGITS]
    tokens += [f"##{d}" for d in DIGITS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary`; no files, no network.

    Returns:
        The tokenizer, with ``pad_token="[PAD]"``, ``eos_token="[EOS]"``,
        ``bos_token="[BOS]"``, ``unk_token="[UNK]"`` and left padding off (callers pad
        by hand, as verl's rollout does: prompts on the left, responses on the right).
    """
    backend = Tokenizer(models.WordPiece(vocabulary(), unk_token=UNK, max_input_chars_per_word=64))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Digits(individual_digits=False)]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text`` without any special token added."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def encode_all(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """:func:`encode` of each text."""
    return [encode(tokenizer, text) for text in texts]
