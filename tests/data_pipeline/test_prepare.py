import json

import pytest
from tokenizers import Tokenizer, models

from data_pipeline.embedded import episode_inventories
from data_pipeline.errors import DataError
from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import END_OF_DOCUMENT, load_tokenizer
from pretrain.config import DataConfig


def episodes_config(directory, **changes) -> DataConfig:
    source = {"kind": "icl_episodes", "episodes": 600, **changes}
    return DataConfig(dir=str(directory), sources=[source], val_fraction=0.1)


def test_preparing_twice_gives_byte_identical_files(tmp_path):
    first = prepare(episodes_config(tmp_path / "a"), vocab_size=512, log=lambda *_: None)
    second = prepare(episodes_config(tmp_path / "b"), vocab_size=512, log=lambda *_: None)
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (first.dir / name).read_bytes() == (second.dir / name).read_bytes()
    assert first.fingerprint == second.fingerprint


def test_documents_end_with_the_end_of_document_token_and_splits_are_disjoint(tmp_path):
    data = prepare(episodes_config(tmp_path / "d"), vocab_size=512, log=lambda *_: None)
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    documents = {}
    for split in ("train", "val"):
        tokens = data.tokens(split).tolist()
        assert tokens[-1] == data.end_of_document_id
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        documents[split] = {d.strip() for d in text.split(END_OF_DOCUMENT) if d.strip()}
    assert len(documents["train"]) > 400 and len(documents["val"]) > 20
    assert not documents["train"] & documents["val"]
    meta = json.loads((data.dir / "meta.json").read_text())
    assert meta["tokens"]["train"] == len(data.tokens("train"))


def test_every_made_up_word_is_a_single_token(tmp_path):
    data = prepare(episodes_config(tmp_path / "d"), vocab_size=512, log=lambda *_: None)
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    inputs, labels = episode_inventories(64, 8)
    assert all(len(tokenizer.encode(word).ids) == 1 for word in inputs + labels)


def test_prepared_data_is_reused_and_a_different_recipe_is_refused_not_overwritten(tmp_path):
    directory = tmp_path / "d"
    prepare(episodes_config(directory), vocab_size=512, log=lambda *_: None)
    train_bytes = (directory / "train.bin").read_bytes()
    messages = []
    prepare(episodes_config(directory), vocab_size=512, log=messages.append)
    assert messages == [], "an up-to-date directory is reused, not rebuilt"
    with pytest.raises(DataError, match=f"{directory}: was prepared from a different data config"):
        prepare(episodes_config(directory, episodes=700), vocab_size=512)
    assert (directory / "train.bin").read_bytes() == train_bytes


def test_a_directory_that_is_not_prepared_data_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no prepared data"):
        prepare(episodes_config(tmp_path / "d"), vocab_size=512)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_a_given_tokenizer_without_an_end_of_document_token_is_refused_by_name(tmp_path):
    path = tmp_path / "tok.json"
    Tokenizer(models.BPE()).save(str(path))
    with pytest.raises(DataError, match=f"{path}: has no {END_OF_DOCUMENT} token"):
        load_tokenizer(path, max_vocab_size=512)


def test_a_given_tokenizer_that_is_not_json_is_refused_by_name(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("not a tokenizer")
    with pytest.raises(DataError, match=f"{path}: not a valid tokenizer.json"):
        load_tokenizer(path, max_vocab_size=512)
