import pytest

from data_pipeline.common.errors import DataError
from data_pipeline.embedded import episode_inventories, icl_episodes, stdlib_docstrings

EPISODE_ARGS = dict(vocabulary_words=64, label_words=8, words_per_episode=4, pairs_per_episode=24)


def test_episodes_show_one_fresh_mapping_each_and_are_reproducible():
    episodes = list(icl_episodes(200, seed=7, **EPISODE_ARGS))
    assert episodes == list(icl_episodes(200, seed=7, **EPISODE_ARGS))
    assert episodes != list(icl_episodes(200, seed=8, **EPISODE_ARGS))
    inputs, labels = episode_inventories(64, 8)
    assert not set(inputs) & set(labels)
    mappings = []
    for episode in episodes:
        words = episode.split()
        assert len(words) == 48
        mapping = {}
        for word, label in zip(words[::2], words[1::2]):
            assert word in inputs and label in labels
            assert mapping.setdefault(word, label) == label, "a word keeps its label within an episode"
        assert len(mapping) <= 4
        mappings.append(mapping)
    # Labels are drawn per episode: the same word gets different labels in different episodes.
    labels_of_a_word = {m[w] for m in mappings for w in m if w == inputs[0]}
    assert len(labels_of_a_word) > 1


def test_asking_for_more_made_up_words_than_exist_is_a_clear_error():
    with pytest.raises(DataError, match="lower vocabulary_words or label_words"):
        list(icl_episodes(1, seed=0, vocabulary_words=4900, label_words=8, words_per_episode=4, pairs_per_episode=2))


def test_stdlib_docstrings_are_real_prose_from_the_standard_library():
    # Read lazily, file by file in sorted order: the test stops once the corpus has shown its size and kind,
    # a fraction of the standard library, rather than parsing all of it.
    count, characters, seen_abc = 0, 0, False
    for text in stdlib_docstrings(min_chars=40):
        assert len(text) >= 40
        count, characters = count + 1, characters + len(text)
        seen_abc = seen_abc or text.startswith("Abstract Base Classes (ABCs)")  # Lib/abc.py's module docstring
        if count > 3000 and characters > 1_000_000 and seen_abc:
            break
    assert count > 3000 and characters > 1_000_000 and seen_abc
