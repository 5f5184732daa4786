"""The data section of a run's config (sources, shards, loader), the base every config section is built on, and
the YAML, override and validation-message rules every config file shares.

Bad input raises `ConfigError`, whose message is one line naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_pipeline.common.errors import ConfigError

OPEN_SHARDS = 8  # shards a reader keeps open (their indexes, and remote shards' bytes)


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them rather than silently ignore them. No setting
    # means anything at infinity or NaN (`lr: .nan` trains nothing, silently).
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

SectionT = TypeVar("SectionT", bound=Section)


class _SourceBase(Section):
    weight: float = Field(
        1.0, gt=0, description="times each document is used; a fraction keeps a fixed, hash-chosen share of them"
    )


class StdlibDocstringsSource(_SourceBase):
    """English prose harvested from the docstrings of the Python standard library on this machine."""

    kind: Literal["stdlib_docstrings"]
    min_chars: int = Field(40, ge=1, description="shorter docstrings are skipped")


class InContextEpisodesSource(_SourceBase):
    """Procedurally generated episodes: a fresh word -> label mapping shown by example, pair after pair."""

    kind: Literal["icl_episodes"]
    seed: int = 0
    episodes: int = Field(12000, ge=1)
    vocabulary_words: int = Field(64, ge=2, description="size of the made-up input-word inventory")
    label_words: int = Field(8, ge=2, description="size of the made-up label inventory")
    words_per_episode: int = Field(4, ge=1)
    pairs_per_episode: int = Field(24, ge=1)

    @model_validator(mode="after")
    def _episode_fits_inventory(self) -> InContextEpisodesSource:
        if self.words_per_episode > self.vocabulary_words:
            raise ValueError("words_per_episode cannot exceed vocabulary_words")
        return self


class _FileSourceBase(_SourceBase):
    paths: list[str] = Field(min_length=1, description="files or glob patterns, read in sorted order")


class ParquetSource(_FileSourceBase):
    """Parquet files, streamed one row group at a time."""

    kind: Literal["parquet"]
    text_column: str = "text"


class JsonlSource(_FileSourceBase):
    """JSON Lines files, plain or compressed (.gz, .zst): one object per line."""

    kind: Literal["jsonl"]
    text_field: str = "text"


class TextSource(_FileSourceBase):
    """Plain text files: each file is one document."""

    kind: Literal["txt"]


Source = Annotated[
    StdlibDocstringsSource | InContextEpisodesSource | ParquetSource | JsonlSource | TextSource,
    Field(discriminator="kind"),
]
SOURCE_KINDS = ("stdlib_docstrings", "icl_episodes", "parquet", "jsonl", "txt")


class DataConfig(Section):
    dir: str = Field("data/quickstart", description="where the tokenizer, shards and manifest.json are written")
    sources: list[Source] = Field(
        default_factory=lambda: [
            StdlibDocstringsSource(kind="stdlib_docstrings"),
            InContextEpisodesSource(kind="icl_episodes"),
        ],
        min_length=1,
    )
    tokenizer: str | None = Field(None, description="a tokenizer.json to use instead of training one")
    tokenizer_sample_bytes: int = Field(200_000_000, ge=1, description="text the BPE is trained on, at most")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    block_tokens: int = Field(8192, ge=1, description="tokens per stored sample; windows are cut from blocks")
    shard_bytes: int = Field(256 * 2**20, ge=1, description="target size of one shard")
    partitions: int = Field(
        16, ge=1, description="pieces the corpus is prepared in, each by one worker: at least the number of workers"
        " (processes, SLURM tasks) to use; the shards depend on it, not on the number of workers",
    )
    workers: int = Field(0, ge=0, description="processes for prepare, each taking whole partitions; 0: one per core")
    unit_bytes: int = Field(128 * 2**20, ge=1, description="a plain jsonl file larger than this is read in ranges of"
                            " this many bytes, each dealt to a partition like a file or a parquet row group")
    shard_url: str | None = Field(
        None, description="read shards from here instead of data.dir: a prefix or a template with {shard}"
    )
    fetch_timeout_seconds: float = Field(
        60, gt=0, description="a remote shard's connect and read timeout (a pipe: command's longest silence)"
    )
    fetch_deadline_seconds: float = Field(
        3600, gt=0, description="the longest one try of a remote shard's transfer may take, however steadily bytes"
        " arrive (a pipe: command is killed past it, with what it started); then it is tried again like a timeout",
    )
    fetch_retries: int = Field(5, ge=0, description="further tries of a remote shard's transfer, with growing pauses")
    shard_cache: str | None = Field(
        None, description="a directory to keep fetched remote shards in (none: temporary files, gone once read);"
        " ranks, workers and jobs may share one: a shard is hashed again whenever its file changed since it was"
        " last checked (with verify: on_read, each time it is opened)",
    )
    shard_cache_bytes: int = Field(
        100 * 2**30, ge=0, description="the most shard_cache holds, transfers under way included; least recently"
        " used out first, and partial files of killed transfers deleted",
    )
    verify: Literal["start", "on_read"] = Field(
        "start", description="start: check every shard's sha256 before training; on_read: as each shard is read"
    )
    shuffle_blocks: int = Field(64, ge=1, description="blocks whose windows are shuffled together (bounded window)")
    mix_shards: int = Field(
        OPEN_SHARDS, ge=1, le=OPEN_SHARDS, description="shards whose blocks are interleaved, in proportion to their"
        " sizes, before the blocks form shuffle groups: sources written to separate shards then mix within every"
        f" step, not in long stretches of one source; at most {OPEN_SHARDS}, the shards a reader keeps open"
    )
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank")
    document_masking: bool = Field(
        False, description="tokens attend only within their own document, not across packed neighbours"
    )

    @field_validator("shard_url")
    @classmethod
    def no_credentials(cls, shard_url: str | None) -> str | None:
        # The config is written to the run directory, the launch records and W&B, and the URL into messages.
        if shard_url is not None and re.search(r"://[^/@\s]+@", shard_url):
            raise ValueError(
                "holds credentials (user:password@host), and the config is written to the run directory and W&B;"
                " give them to the fetch command instead, from the environment or a netrc file (e.g."
                " pipe:curl -sf --netrc https://host/{shard})"
            )
        return shard_url


@dataclass(frozen=True)
class BatchLayout:
    world_size: int
    seq_len: int
    micro_batch_size: int
    accumulation_steps: int

    @property
    def sequences_per_rank(self) -> int:
        return self.micro_batch_size * self.accumulation_steps

    @property
    def sequences_per_step(self) -> int:
        return self.sequences_per_rank * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len


def set_dotted(tree: dict[str, Any], override: str) -> None:
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    # YAML parsing gives numbers, booleans and lists their types; YAML 1.1 reads "3e-4" as a string,
    # which pydantic's number fields accept.
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot parse value {raw_value!r}: {error}") from None
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


def describe_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    # Discriminated unions add the variant's tag to the location; it is noise to a user.
    location = ".".join(str(part) for part in first["loc"] if part not in SOURCE_KINDS)
    detail = first["msg"]
    if first["type"] == "extra_forbidden":
        detail = "unknown key (check its spelling and section)"
    elif "input" in first and not isinstance(first["input"], (dict, list)) and "credentials" not in detail:
        detail += f" (got {first['input']!r})"  # never a value refused for holding credentials
    more = len(error.errors()) - 1
    suffix = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{location or 'config'}: {detail}{suffix}"


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds ({} for an empty file); ConfigError naming the file otherwise."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def validated(schema: type[SectionT], tree: dict[str, Any], where: str = "") -> SectionT:
    """`tree` checked against `schema`; a ConfigError naming the field (after `where`, a file) otherwise."""
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{where}{describe_validation_error(error)}") from None
