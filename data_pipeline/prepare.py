"""Turn the configured sources into a tokenizer and packed token files, once, in `data.dir`.

Layout of a prepared directory:
    tokenizer.json   the byte-level BPE (trained here, or a copy of the given one)
    train.bin        every training document's tokens followed by the end-of-document token, concatenated
    val.bin          the same for the validation documents
    meta.json        token counts, dtype, tokenizer hash, and the fingerprint of everything that shaped them

A directory is written under a temporary name and renamed into place, so a crash never leaves a half-written
dataset behind, and an existing dataset made from a different config is refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.embedded import icl_episodes, stdlib_docstrings
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import END_OF_DOCUMENT, file_sha256, load_tokenizer, train_bpe
from pretrain.config import DataConfig, InContextEpisodesSource, StdlibDocstringsSource

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PreparedData:
    dir: Path
    fingerprint: str
    dtype: str
    end_of_document_id: int
    tokenizer_vocab_size: int

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream, memory-mapped (never loaded whole)."""
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")


def source_documents(source: StdlibDocstringsSource | InContextEpisodesSource) -> Iterator[str]:
    if isinstance(source, StdlibDocstringsSource):
        return stdlib_docstrings(source.min_chars)
    return icl_episodes(
        source.episodes,
        source.seed,
        source.vocabulary_words,
        source.label_words,
        source.words_per_episode,
        source.pairs_per_episode,
    )


def fingerprint(data: DataConfig, vocab_size: int) -> str:
    recipe = {
        "format": FORMAT_VERSION,
        "sources": [source.model_dump(mode="json") for source in data.sources],
        "tokenizer": file_sha256(data.tokenizer) if data.tokenizer else None,
        "vocab_size": vocab_size,
        "val_fraction": data.val_fraction,
        # The docstrings differ between Python versions.
        "python": sys.version_info[:2],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _is_validation(document: str, val_fraction: float) -> bool:
    # A hash of the text, not its position, so adding a source never moves another's documents between splits.
    return zlib.crc32(document.encode()) < val_fraction * 2**32


def _write_tokens(path: Path, encodings: list[list[int]], end_of_document_id: int, dtype: str) -> int:
    stream = np.fromiter(
        (token for ids in encodings for token in (*ids, end_of_document_id)),
        dtype=dtype,
    )
    stream.tofile(path)
    return len(stream)


def _open_existing(directory: Path, expected_fingerprint: str) -> PreparedData:
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise DataError(
            f"{directory}: exists but holds no prepared data (no meta.json); point data.dir elsewhere or remove it"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != expected_fingerprint:
        raise DataError(
            f"{directory}: was prepared from a different data config or tokenizer (fingerprint"
            f" {meta.get('fingerprint', '?')[:12]} != {expected_fingerprint[:12]}); set data.dir to a new"
            " directory, or remove this one to rebuild it"
        )
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        if not (directory / name).exists():
            raise DataError(f"{directory / name}: missing from the prepared data; remove {directory} to rebuild it")
    if file_sha256(directory / "tokenizer.json") != meta["tokenizer_sha256"]:
        raise DataError(
            f"{directory / 'tokenizer.json'}: does not match the hash in meta.json; remove {directory} to rebuild it"
        )
    return PreparedData(
        dir=directory,
        fingerprint=meta["fingerprint"],
        dtype=meta["dtype"],
        end_of_document_id=meta["end_of_document_id"],
        tokenizer_vocab_size=meta["tokenizer_vocab_size"],
    )


def prepare(data: DataConfig, vocab_size: int, log=print) -> PreparedData:
    """Prepare `data.dir` if needed and return it. Reuses a directory prepared from the same recipe."""
    directory = Path(data.dir)
    expected = fingerprint(data, vocab_size)
    if directory.exists():
        return _open_existing(directory, expected)

    log(f"preparing data in {directory} (runs once; later runs reuse it)")
    documents = {"train": [], "val": []}
    for source in data.sources:
        for document in source_documents(source):
            documents["val" if _is_validation(document, data.val_fraction) else "train"].append(document)
    if not documents["train"] or not documents["val"]:
        raise DataError(
            f"{directory}: the sources gave {len(documents['train'])} training and {len(documents['val'])}"
            " validation documents; add sources or adjust data.val_fraction"
        )

    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer, vocab_size)
    else:
        tokenizer = train_bpe(documents["train"], vocab_size)
    end_of_document_id = tokenizer.token_to_id(END_OF_DOCUMENT)
    dtype = "uint16" if tokenizer.get_vocab_size() <= 2**16 else "uint32"

    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save(str(staging / "tokenizer.json"))
    token_counts = {}
    for split, texts in documents.items():
        encodings = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
        token_counts[split] = _write_tokens(staging / f"{split}.bin", encodings, end_of_document_id, dtype)
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": expected,
        "tokenizer_sha256": file_sha256(staging / "tokenizer.json"),
        "tokenizer_vocab_size": tokenizer.get_vocab_size(),
        "end_of_document_id": end_of_document_id,
        "dtype": dtype,
        "documents": {split: len(texts) for split, texts in documents.items()},
        "tokens": token_counts,
        "sources": [source.model_dump(mode="json") for source in data.sources],
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    staging.rename(directory)
    log(
        f"prepared {token_counts['train']:,} training and {token_counts['val']:,} validation tokens"
        f" ({tokenizer.get_vocab_size()} token vocabulary)"
    )
    return _open_existing(directory, expected)
