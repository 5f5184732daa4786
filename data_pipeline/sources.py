"""Documents from the configured sources, in a fixed order, each source weighted.

Every reader streams: parquet one row group at a time, jsonl one line at a time, so a source can be far
larger than memory. Problems are reported as DataError naming the file (and line) and what to do.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import (
    InContextEpisodesSource,
    JsonlSource,
    ParquetSource,
    Source,
    StdlibDocstringsSource,
    TextSource,
)
from data_pipeline.embedded import icl_episodes, stdlib_docstrings
from data_pipeline.errors import DataError


def expand_paths(patterns: list[str]) -> list[Path]:
    """The files a source names, each pattern's matches sorted; a pattern that matches nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"{pattern}: matches no files; check the path in data.sources")
        files += [Path(match) for match in matches]
    return files


def _parquet_documents(source: ParquetSource) -> Iterator[str]:
    import pyarrow.parquet as pq  # deferred: only parquet sources need it

    for path in expand_paths(source.paths):
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: not a readable parquet file ({error})") from None
        columns = parquet.schema_arrow.names
        if source.text_column not in columns:
            raise DataError(
                f"{path}: has no column {source.text_column!r} (it has: {', '.join(columns)}); set text_column"
                " in data.sources"
            )
        for batch in parquet.iter_batches(columns=[source.text_column], batch_size=4096):
            yield from (text for text in batch.column(0).to_pylist() if text)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.suffix == ".zst":
        import zstandard  # deferred: only .zst files need it

        return zstandard.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file, plain or compressed; a line
    that is not JSON is a DataError naming the file and line."""
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def _jsonl_documents(source: JsonlSource) -> Iterator[str]:
    for path in expand_paths(source.paths):
        for number, record in jsonl_records(path):
            if not isinstance(record, dict) or source.text_field not in record:
                raise DataError(f"{path}:{number}: has no field {source.text_field!r}; set text_field in data.sources")
            if text := record[source.text_field]:
                yield str(text)


def _text_documents(source: TextSource) -> Iterator[str]:
    for path in expand_paths(source.paths):
        with _open_text(path) as file:
            if text := file.read():
                yield text


def raw_documents(source: Source) -> Iterator[str]:
    if isinstance(source, StdlibDocstringsSource):
        return stdlib_docstrings(source.min_chars)
    if isinstance(source, InContextEpisodesSource):
        return icl_episodes(
            source.episodes,
            source.seed,
            source.vocabulary_words,
            source.label_words,
            source.words_per_episode,
            source.pairs_per_episode,
        )
    if isinstance(source, ParquetSource):
        return _parquet_documents(source)
    if isinstance(source, JsonlSource):
        return _jsonl_documents(source)
    return _text_documents(source)


def describe(source: Source) -> str:
    return ", ".join(source.paths) if hasattr(source, "paths") else source.kind


def text_hash(text: str) -> int:
    """A stable 32-bit hash of a document: it decides its split and its share under fractional weights."""
    return zlib.crc32(text.encode())


def weighted_documents(source: Source) -> Iterator[str]:
    """The source's documents, each repeated `weight` times; the fraction keeps a hash-chosen share."""
    whole, fraction = divmod(source.weight, 1.0)
    count = 0
    for text in raw_documents(source):
        count += 1
        # A different hash than the split's, so the kept share is not biased towards one split.
        repeats = int(whole) + (zlib.crc32(text.encode(), 0x5EED) < fraction * 2**32)
        for _ in range(repeats):
            yield text
    if count == 0:
        raise DataError(f"{describe(source)}: the {source.kind} source gave no documents; remove it or fix its files")
