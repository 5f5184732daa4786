"""Byte-level BPE tokenizers: train one on the sources, or load a given tokenizer.json."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.common.errors import DataError

END_OF_DOCUMENT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # A prefix space makes a word's first occurrence in a document tokenize like every later one.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_DOCUMENT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path, max_vocab_size: int) -> Tokenizer:
    path = Path(path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: tokenizer file not found") from None
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{path}: not a valid tokenizer.json ({error})") from None
    if tokenizer.token_to_id(END_OF_DOCUMENT) is None:
        raise DataError(f"{path}: has no {END_OF_DOCUMENT} token to separate documents; add it as a special token")
    if (bound := id_bound(tokenizer)) > max_vocab_size:
        raise DataError(
            f"{path}: has token ids up to {bound - 1}, at or above model.vocab_size={max_vocab_size}; raise"
            f" model.vocab_size to at least {bound}"
        )
    return tokenizer


def id_bound(tokenizer: Tokenizer) -> int:
    """One more than the highest id the tokenizer can emit: its vocabulary size, unless its ids leave gaps."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
