import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.common.errors import DataError
from data_pipeline.config import DataConfig
from data_pipeline.prepare import prepare
from data_pipeline.sources import all_documents, source_units, unit_documents


def source(**fields):
    return DataConfig(sources=[fields]).sources[0]


def weighted_documents(one_source) -> list[str]:
    return list(all_documents(DataConfig(sources=[one_source])))


def test_parquet_is_read_by_row_group_from_the_configured_column(tmp_path):
    table = pa.table({"body": [f"document {i}" for i in range(10)], "id": list(range(10))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    parquet = source(kind="parquet", paths=[str(tmp_path / "*.parquet")], text_column="body")
    documents = list(weighted_documents(parquet))
    assert documents == [f"document {i}" for i in range(10)]


def test_a_missing_parquet_column_is_named_with_the_file(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    named = re.escape(str(tmp_path / "a.parquet")) + r": has no column 'text' \(it has: body\)"
    with pytest.raises(DataError, match=named):
        list(weighted_documents(source(kind="parquet", paths=[str(tmp_path / "a.parquet")])))


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    lines = "".join(json.dumps({"text": f"line {i}", "meta": i}) + "\n" for i in range(5)).encode()
    path = tmp_path / f"a.jsonl{suffix}"
    path.write_bytes({"": lambda b: b, ".gz": gzip.compress, ".zst": zstandard.compress}[suffix](lines))
    assert list(weighted_documents(source(kind="jsonl", paths=[str(path)]))) == [f"line {i}" for i in range(5)]


def test_a_broken_jsonl_line_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid JSON")):
        list(weighted_documents(source(kind="jsonl", paths=[str(path)])))
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:1: has no field 'text'")):
        list(weighted_documents(source(kind="jsonl", paths=[str(path)])))


def test_text_files_by_glob_are_one_document_each_in_sorted_order(tmp_path):
    for name in ("b.txt", "a.txt"):
        (tmp_path / name).write_text(f"contents of {name}")
    documents = list(weighted_documents(source(kind="txt", paths=[str(tmp_path / "*.txt")])))
    assert documents == ["contents of a.txt", "contents of b.txt"]


def test_a_pattern_that_matches_nothing_and_an_empty_source_are_named(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nothing*.txt'}: matches no files")):
        list(weighted_documents(source(kind="txt", paths=[str(tmp_path / "nothing*.txt")])))
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "some.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    data = DataConfig(dir=str(tmp_path / "d"), workers=1, sources=[
        {"kind": "jsonl", "paths": [str(tmp_path / "some.jsonl")]},
        {"kind": "jsonl", "paths": [str(tmp_path / "empty.jsonl")]}])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty.jsonl'}: the jsonl source gave no documents")):
        prepare(data, vocab_size=300, log=lambda *_: None)


def test_weights_repeat_documents_or_keep_a_fixed_share_of_them(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(2000)))
    doubled = list(weighted_documents(source(kind="jsonl", paths=[str(path)], weight=2.0)))
    assert len(doubled) == 4000 and doubled[:2] == ["document number 0"] * 2
    half = list(weighted_documents(source(kind="jsonl", paths=[str(path)], weight=0.5)))
    assert 900 < len(half) < 1100
    assert half == list(weighted_documents(source(kind="jsonl", paths=[str(path)], weight=0.5)))


def test_a_large_plain_jsonl_file_is_read_in_byte_ranges_that_give_each_line_once(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 17)}) + "\n" for i in range(500)]
    path.write_text("".join(lines))
    jsonl = source(kind="jsonl", paths=[str(path)])
    units = source_units(0, jsonl, unit_bytes=1000)
    assert len(units) == -(-path.stat().st_size // 1000) and units[0].start == 0
    assert [text for unit in units for text in unit_documents(jsonl, unit)] == [
        json.loads(line)["text"] for line in lines]
    path.write_text("".join(lines[:300]) + "{broken\n" + "".join(lines[300:]))
    with pytest.raises(DataError, match=re.escape(f"{path} (byte {sum(map(len, lines[:300]))}): not valid JSON")):
        [text for unit in source_units(0, jsonl, unit_bytes=1000) for text in unit_documents(jsonl, unit)]
