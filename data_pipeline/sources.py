"""Documents from the configured sources, in a fixed order, each source weighted.

A source is read in units, each read whole by one worker: a file, a parquet row group, or a generated source.
Every reader streams: parquet one batch at a time, jsonl one line at a time, so a unit can be far larger than
memory. Problems are reported as DataError naming the file (and line) and what to do.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.errors import DataError
from data_pipeline.config import (
    DataConfig,
    InContextEpisodesSource,
    JsonlSource,
    ParquetSource,
    Source,
    StdlibDocstringsSource,
)
from data_pipeline.embedded import icl_episodes, stdlib_docstrings


def expand_paths(patterns: list[str]) -> list[Path]:
    """The files a source names, each pattern's matches sorted; a pattern that matches nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"{pattern}: matches no files; check the path in data.sources")
        files += [Path(match) for match in matches]
    return files


def _parquet_file(path: Path, source: ParquetSource):
    import pyarrow.parquet as pq  # deferred: only parquet sources need it

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
    return parquet


def _row_group_documents(source: ParquetSource, path: Path, row_group: int) -> Iterator[str]:
    parquet = _parquet_file(path, source)
    for batch in parquet.iter_batches(batch_size=4096, row_groups=[row_group], columns=[source.text_column]):
        yield from (text for text in batch.column(0).to_pylist() if text)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.suffix == ".zst":
        import zstandard  # deferred: only .zst files need it

        return zstandard.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed value) of each non-blank line of a JSON Lines file, plain or compressed, `where` being
    `path:line`; a line that is not JSON is a DataError naming the file and line."""
    with _open_text(path) as lines:
        yield from _parsed(enumerate(lines, start=1), lambda number: f"{path}:{number}")


def _parsed(lines: Iterable[tuple[int, str]], where) -> Iterator[tuple[str, object]]:
    for position, line in lines:
        if not line.strip():
            continue
        try:
            yield where(position), json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where(position)}: not valid JSON ({error.msg})") from None


def _lines_in_range(path: Path, start: int, end: int) -> Iterator[tuple[int, str]]:
    """(byte offset, text) of the lines of a plain file that start in [start, end): ranges that tile a file
    give each line to exactly one of them."""
    with open(path, "rb") as file:
        if start:
            file.seek(start - 1)
            file.readline()  # the line holding byte start - 1 belongs to the range before
        while (offset := file.tell()) < end and (line := file.readline()):
            yield offset, line.decode("utf-8", errors="replace")


def _jsonl_documents(source: JsonlSource, unit: Unit) -> Iterator[str]:
    path = Path(unit.path)
    if unit.start is None:
        records = jsonl_records(path)
    else:
        records = _parsed(_lines_in_range(path, unit.start, unit.end), lambda offset: f"{path} (byte {offset})")
    for where, record in records:
        if not isinstance(record, dict) or source.text_field not in record:
            raise DataError(f"{where}: has no field {source.text_field!r}; set text_field in data.sources")
        if text := record[source.text_field]:
            yield str(text)


def _text_document(path: Path) -> Iterator[str]:
    with _open_text(path) as file:
        if text := file.read():
            yield text


@dataclass(frozen=True)
class Unit:
    """A piece of one source that one worker reads whole: a generated source, a file, or a parquet row group."""

    source: int  # its index in data.sources
    path: str | None = None
    row_group: int | None = None
    start: int | None = None  # a byte range of a plain jsonl file: the lines that start in it
    end: int | None = None


def source_units(index: int, source: Source, unit_bytes: int) -> list[Unit]:
    """The units of data.sources[index], in a fixed order; a plain jsonl file larger than `unit_bytes` is read
    in ranges of that many bytes (a compressed one cannot be entered mid-way, and is one unit)."""
    if isinstance(source, (StdlibDocstringsSource, InContextEpisodesSource)):
        return [Unit(index)]
    paths = expand_paths(source.paths)
    if isinstance(source, ParquetSource):
        return [Unit(index, str(path), group)
                for path in paths for group in range(_parquet_file(path, source).num_row_groups)]
    units = []
    for path in paths:
        size = path.stat().st_size
        if isinstance(source, JsonlSource) and path.suffix not in (".gz", ".zst") and size > unit_bytes:
            units += [Unit(index, str(path), start=start, end=min(start + unit_bytes, size))
                      for start in range(0, size, unit_bytes)]
        else:
            units.append(Unit(index, str(path)))
    return units


def unit_documents(source: Source, unit: Unit) -> Iterator[str]:
    """The documents of one unit of `source`, unweighted."""
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
        return _row_group_documents(source, Path(unit.path), unit.row_group)
    if isinstance(source, JsonlSource):
        return _jsonl_documents(source, unit)
    return _text_document(Path(unit.path))


def describe(source: Source) -> str:
    return ", ".join(source.paths) if hasattr(source, "paths") else source.kind


def text_hash(text: str) -> int:
    """A stable 32-bit hash of a document: it decides its split and its share under fractional weights."""
    return zlib.crc32(text.encode())


def is_validation(text: str, val_fraction: float) -> bool:
    # By a hash of the text, not its position: adding a source never moves another's documents between splits.
    return text_hash(text) < val_fraction * 2**32


def weighted(source: Source, documents: Iterable[str]) -> Iterator[str]:
    """Each document repeated `source.weight` times; the fraction keeps a hash-chosen share."""
    whole, fraction = divmod(source.weight, 1.0)
    for text in documents:
        # A different hash than the split's, so the kept share is not biased towards one split.
        repeats = int(whole) + (zlib.crc32(text.encode(), 0x5EED) < fraction * 2**32)
        for _ in range(repeats):
            yield text


def interleave(streams: list[Iterator[tuple[int, str]]]) -> Iterator[tuple[int, str]]:
    """One document from each stream in turn, so that any stretch of the token stream (and so any shuffle window
    of the loader) mixes the sources rather than holding one of them."""
    streams = list(streams)
    while streams:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            else:
                yield item


def unit_group_documents(sources: list[Source], units: list[Unit]) -> Iterator[tuple[int, str]]:
    """(source index, document) for the weighted documents of some units (a partition's), the sources
    interleaved."""
    by_source: dict[int, list[Unit]] = {}
    for unit in units:
        by_source.setdefault(unit.source, []).append(unit)
    return interleave([_source_stream(index, sources[index], its_units)
                       for index, its_units in sorted(by_source.items())])


def _source_stream(index: int, source: Source, units: list[Unit]) -> Iterator[tuple[int, str]]:
    for unit in units:
        for text in weighted(source, unit_documents(source, unit)):
            yield index, text


def all_units(data: DataConfig) -> list[Unit]:
    """Every source's units, source by source."""
    return [unit for index, source in enumerate(data.sources) for unit in source_units(index, source, data.unit_bytes)]


def all_documents(data: DataConfig) -> Iterator[str]:
    """The weighted documents of every unit of every source, the sources interleaved."""
    return (text for _, text in unit_group_documents(data.sources, all_units(data)))
