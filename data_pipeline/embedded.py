"""Built-in sources that need no download: they are generated on the machine that trains.

- `stdlib_docstrings`: real English prose, the docstrings of the Python standard library that every Python
  installation carries (about 1.8 MB).
- `icl_episodes`: in-context-learning episodes. Each draws a few made-up words and gives each a random
  made-up label, then lists (word, label) pairs drawn from them. A label can only be predicted from earlier
  pairs of the same episode, so a model that gets it right is learning in context.

An episode is laid out as bare pairs, `w1 l1 w2 l2 ...`, with no separators: then the answer directly follows
the earlier copy of the query word, the pattern a small transformer learns within minutes (the classic
induction pattern: find the earlier copy of the current token, copy what followed it). With separators between
and inside pairs, a 2-3 layer model had not learned it after 4 minutes on 2 CPU cores: the answer then sits two
tokens after the match, which needs more composition.
"""

from __future__ import annotations

import ast
import inspect
import random
import sysconfig
import warnings
from collections.abc import Iterator
from itertools import product
from pathlib import Path

from data_pipeline.common.errors import DataError

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# The made-up word inventory is fixed (not drawn from the run's seed) so every run, tokenizer and evaluation
# agrees on which strings are words and which are labels.
_INVENTORY_SEED = 1234


def made_up_words(count: int, offset: int = 0) -> list[str]:
    """`count` distinct pronounceable non-words (consonant-vowel-consonant-vowel), from a fixed shuffle."""
    syllables = ["".join(pair) for pair in product(_CONSONANTS, _VOWELS)]
    words = ["".join(pair) for pair in product(syllables, repeat=2)]
    random.Random(_INVENTORY_SEED).shuffle(words)
    if offset + count > len(words):
        raise DataError(
            f"icl_episodes: only {len(words)} made-up words exist, {offset + count} were asked for;"
            " lower vocabulary_words or label_words"
        )
    return words[offset : offset + count]


def episode_inventories(vocabulary_words: int, label_words: int) -> tuple[list[str], list[str]]:
    """The input words and the (disjoint) label words of the episodes."""
    return made_up_words(vocabulary_words), made_up_words(label_words, offset=vocabulary_words)


def icl_episodes(
    episodes: int,
    seed: int,
    vocabulary_words: int,
    label_words: int,
    words_per_episode: int,
    pairs_per_episode: int,
) -> Iterator[str]:
    rng = random.Random(seed)
    inputs, labels = episode_inventories(vocabulary_words, label_words)
    for _ in range(episodes):
        chosen = rng.sample(inputs, words_per_episode)
        mapping = {word: rng.choice(labels) for word in chosen}
        pairs = (rng.choice(chosen) for _ in range(pairs_per_episode))
        yield " ".join(f"{word} {mapping[word]}" for word in pairs)


def stdlib_docstrings(min_chars: int) -> Iterator[str]:
    """Module, class and function docstrings of this interpreter's standard library, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        # Installed third-party packages are not the standard library and differ between machines.
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in the stdlib's own sources
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # the stdlib ships a few deliberately broken files as test fixtures
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node, clean=False)
                if docstring and len(text := inspect.cleandoc(docstring)) >= min_chars:
                    yield text
