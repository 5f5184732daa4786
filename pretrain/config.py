"""The one typed config of a run: loaded from YAML, overridden from the command line, validated.

Every entry point goes through `load_config`. Bad input raises `ConfigError`, whose message is one line
naming the field; entry points print it and exit with code 2 (`exit_on_config_error`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ERROR_EXIT_CODE = 2


class ConfigError(ValueError):
    """A config that cannot run. The message names the field and what is wrong with it."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them rather than silently ignore them.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(_Section):
    vocab_size: int = Field(2048, ge=2, le=2**31 - 1)
    seq_len: int = Field(128, ge=1, description="context length in tokens")
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=1)
    position: Literal["learned", "rotary"] = "learned"
    attention_kernel: Literal["auto", "math"] = Field(
        "auto", description="auto: PyTorch's choice (flash where it can); math: the plain matmul-softmax path, which"
        " is faster on CPUs for small heads in bf16 (BENCHMARKS.md)"
    )
    rotary_base: float = Field(10000.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.position == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError("rotary positions need an even head dimension (d_model / n_head)")
        return self


class _SourceBase(_Section):
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
    Union[StdlibDocstringsSource, InContextEpisodesSource, ParquetSource, JsonlSource, TextSource],
    Field(discriminator="kind"),
]
SOURCE_KINDS = ("stdlib_docstrings", "icl_episodes", "parquet", "jsonl", "txt")


class DataConfig(_Section):
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
    workers: int = Field(0, ge=0, description="tokenizer processes for prepare; 0: one per core")
    shard_url: str | None = Field(
        None, description="read shards from here instead of data.dir: a prefix or a template with {shard}"
    )
    verify: Literal["start", "on_read"] = Field(
        "start", description="start: check every shard's sha256 before training; on_read: as each shard is read"
    )
    shuffle_blocks: int = Field(64, ge=1, description="blocks whose windows are shuffled together (bounded window)")
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank")
    document_masking: bool = Field(
        False, description="tokens attend only within their own document, not across packed neighbours"
    )


class TrainConfig(_Section):
    global_batch_tokens: int = Field(4096, ge=1, description="tokens per optimizer step, all ranks together")
    micro_batch_size: int = Field(16, ge=1, description="sequences per rank per forward pass")
    max_steps: int = Field(1500, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="lr at the end of the decay, as a fraction of lr")
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="after warmup: cosine decay, or warmup-stable-decay (constant, then a linear decay)"
    )
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: the share of max_steps spent decaying")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints; one is always written at the end")
    checkpoint_steps: list[Annotated[int, Field(ge=1)]] = Field(
        [], description="steps to checkpoint at besides every checkpoint_every: where a WSD run's decay branches start"
    )
    keep_checkpoints: int = Field(
        0, ge=0, description="complete checkpoints kept, newest first, besides those of checkpoint_steps; 0 keeps all"
    )
    resume: Literal["auto", "never"] = "auto"
    branch_from: str | None = Field(
        None, description="a complete checkpoint of another run to start from (weights, optimizer, data position,"
        " step), when this run has none of its own: with schedule wsd, a decay branch of that run's stable phase"
    )


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the device supports it, fp32 otherwise; fp16 uses dynamic loss scaling"
    )
    timeout_minutes: int = Field(10, ge=1, description="how long a collective waits for a missing rank")
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward: less memory for ~1/3 more compute"
    )
    compile: bool = Field(False, description="torch.compile the model (DeepSpeed's engine.compile)")
    # ZeRO knobs, under DeepSpeed's own names so its documentation applies. Buckets count elements.
    overlap_comm: bool = Field(True, description="overlap gradient reduction with the backward pass (ZeRO 1-3)")
    reduce_bucket_size: int = Field(500_000_000, ge=1, description="elements reduced together (ZeRO 1-3)")
    allgather_bucket_size: int = Field(500_000_000, ge=1, description="elements all-gathered together (ZeRO 1-2)")
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=0, description="ZeRO-3: parameters fetched ahead")
    stage3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3: parameters smaller than this stay whole on every rank"
    )
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=1, description="ZeRO-3: gathered parameters held")
    grad_accum_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="micro-batch gradient sums; auto: fp32 under ZeRO 1-3 with bf16/fp16, else the model's"
    )
    communication_data_type: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="gradient reduction dtype; auto: the model's dtype"
    )


class FaultsConfig(_Section):
    max_consecutive_skipped_steps: int = Field(
        10, ge=1, description="steps in a row with a non-finite loss or gradient (each skipped) before the run stops"
    )
    nan_loss_at_steps: list[Annotated[int, Field(ge=1)]] = Field(
        [], description="drill: rank 0's loss at these steps is made NaN, to rehearse the non-finite guard"
    )


class FewShotConfig(_Section):
    """In-context few-shot evaluation (evals/fewshot.py): accuracy against the number of examples k."""

    tasks: list[str] = Field(
        default_factory=lambda: ["word_labels"], min_length=1,
        description="built-in task names (word_labels, word_labels_generate) or .jsonl task files",
    )
    shots: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8, 16], min_length=1)
    items: int | None = Field(1000, ge=1, description="items per task (the first N); None: all of a file's")
    interval: int = Field(0, ge=0, description="steps between evaluations during training; 0: none in the loop")
    items_in_loop: int | None = Field(200, ge=1, description="items per task during training; None: as many as items")
    seed: int = Field(0, description="draws each item's examples; the same seed gives the same prompts")
    example_delimiter: str | None = Field(None, description="between examples; None: the task's own")
    target_delimiter: str | None = Field(None, description="between a context and its answer; None: the task's own")
    batch_size: int = Field(32, ge=1, description="prompts per forward pass")
    max_new_tokens: int = Field(16, ge=1, description="greedy tokens at most, for generation tasks")

    @field_validator("shots")
    @classmethod
    def _shots_are_counts(cls, shots: list[int]) -> list[int]:
        if any(k < 0 for k in shots):
            raise ValueError("numbers of examples cannot be negative")
        return sorted(set(shots))


class EvalConfig(_Section):
    interval: int = Field(250, ge=0, description="steps between validation-loss evaluations; 0: only at the end")
    batches: int = Field(4, ge=1, description="validation micro-batches per rank at each evaluation")
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig)


class LoggingConfig(_Section):
    wandb_project: str = "gpt-pretrain"
    wandb_entity: str | None = Field(None, description="W&B team or user; None: the API key's default entity")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when an API key is configured, offline otherwise"
    )
    wandb_group: str | None = Field(None, description="W&B group; the runs of a sweep share the sweep's name")
    wandb_job_type: str = "train"
    wandb_tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = []
    print_every: int = Field(50, ge=1, description="steps between progress lines (and system/ metrics)")
    stall_alert_minutes: float = Field(
        30.0, ge=0, description="alert when no step has completed for this long (a hung job); 0: never"
    )


ENVIRONMENT_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SlurmConfig(_Section):
    """What `python -m launch run --backend slurm` asks SLURM for; None leaves a setting to the cluster."""

    partition: str | None = None
    account: str | None = None
    time: str = Field("24:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$", description="[D-]HH[:MM[:SS]]")
    cpus_per_task: int | None = Field(None, ge=1)
    job_name: str | None = Field(None, description="default: the run's name")
    mode: Literal["torchrun", "tasks"] = Field(
        "torchrun", description="torchrun: one torchrun per node, c10d rendezvous; tasks: one SLURM task per rank"
    )
    preemption_warning_seconds: int = Field(
        120, ge=10, description="SIGUSR1 this long before the time limit, so the run checkpoints and requeues"
    )
    extra_sbatch: list[Annotated[str, Field(pattern=r"^--[A-Za-z][^\n\r]*$")]] = Field(
        [], description='more #SBATCH options, each as "--option=value"'
    )


class LaunchConfig(_Section):
    environment: dict[Annotated[str, Field(pattern=ENVIRONMENT_NAME)], str] = Field(
        {}, description="environment variables for every rank (NCCL settings and the like)"
    )
    rendezvous_port: int = Field(29500, ge=1024, le=65535, description="multi-node: the c10d rendezvous port")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class Config(_Section):
    name: str = Field("quickstart", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "runs"
    seed: int = Field(0, ge=0)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def batch_layout(self, world_size: int) -> BatchLayout:
        """How the global batch of tokens splits into ranks, micro-batches and accumulation steps."""
        tokens, seq_len, micro = self.train.global_batch_tokens, self.model.seq_len, self.train.micro_batch_size
        tokens_per_micro_step = micro * seq_len * world_size
        if tokens % tokens_per_micro_step:
            raise ConfigError(
                f"train.global_batch_tokens: {tokens} is not divisible by micro_batch_size x seq_len x world_size"
                f" = {micro} x {seq_len} x {world_size} = {tokens_per_micro_step}; pick a multiple of"
                f" {tokens_per_micro_step} or change train.micro_batch_size"
            )
        return BatchLayout(
            world_size=world_size,
            seq_len=seq_len,
            micro_batch_size=micro,
            accumulation_steps=tokens // tokens_per_micro_step,
        )


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


def _set_dotted(tree: dict[str, Any], override: str) -> None:
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


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    # Discriminated unions add the variant's tag to the location; it is noise to a user.
    location = ".".join(str(part) for part in first["loc"] if part not in SOURCE_KINDS)
    detail = first["msg"]
    if first["type"] == "extra_forbidden":
        detail = "unknown key (check its spelling and section)"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        detail += f" (got {first['input']!r})"
    more = len(error.errors()) - 1
    suffix = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{location or 'config'}: {detail}{suffix}"


class SweepSize(_Section):
    """One rung of a model-size ladder; `lr` overrides the sweep's learning rate for this size."""

    n_layer: int = Field(ge=1)
    d_model: int = Field(ge=1)
    n_head: int = Field(ge=1)
    lr: float | None = Field(None, gt=0)


class SweepConfig(_Section):
    """A scaling sweep (configs/sweeps/*.yaml): every size trained on every token budget with every seed,
    each run the base config with its size, budget, learning rate and seed set (`python -m launch sweep`)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = Field(description="the config every run starts from, relative to the working directory")
    overrides: list[str] = Field([], description="KEY=VALUE settings for every run, before the sweep's own")
    sizes: list[SweepSize] = Field(min_length=1)
    tokens_per_parameter: list[Annotated[float, Field(gt=0)]] = Field(
        [], description="token budgets, as multiples of the non-embedding parameter count N"
    )
    compute_budgets: list[Annotated[float, Field(gt=0)]] = Field(
        [], description="or budgets in FLOPs C, for isoFLOP profiles: each size trains on C / (6 N) tokens"
    )
    decay_branches: bool = Field(
        False, description="with train.schedule=wsd: each size and seed trains its largest budget once, and its"
        " smaller budgets branch off that run's stable phase and only decay (saving their stable phases)"
    )
    lr: float | None = Field(None, gt=0, description="for sizes without their own; None: the base config's")
    seeds: list[Annotated[int, Field(ge=0)]] = [0]
    output_dir: str = Field("runs", description="runs go to OUTPUT_DIR/<sweep name>/<run name>")

    @model_validator(mode="after")
    def _one_kind_of_budget(self) -> SweepConfig:
        if bool(self.tokens_per_parameter) == bool(self.compute_budgets):
            raise ValueError("give the token budgets as tokens_per_parameter or as compute_budgets, one of the two")
        return self


def _read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
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


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    tree = _read_yaml_mapping(path, "sweep spec")
    try:
        return SweepConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply `a.b=value` overrides, validate."""
    tree = _read_yaml_mapping(Path(path), "config") if path is not None else {}
    for override in overrides:
        _set_dotted(tree, override)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


@contextmanager
def exit_on_config_error():
    """Turn a ConfigError into one line on stderr and exit code 2, for command-line entry points."""
    try:
        yield
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr, flush=True)
        sys.exit(CONFIG_ERROR_EXIT_CODE)


def deepspeed_config(config: Config, layout: BatchLayout, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, generated from the config (it is never written by hand)."""
    knobs = config.deepspeed
    zero: dict[str, Any] = {"stage": knobs.zero_stage}
    if knobs.zero_stage >= 1:
        zero.update(overlap_comm=knobs.overlap_comm, reduce_bucket_size=knobs.reduce_bucket_size)
    if knobs.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=knobs.allgather_bucket_size, contiguous_gradients=True)
    if knobs.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=knobs.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=knobs.stage3_param_persistence_threshold,
            stage3_max_live_parameters=knobs.stage3_max_live_parameters,
        )
    ds: dict[str, Any] = {
        "train_batch_size": layout.sequences_per_step,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.accumulation_steps,
        "gradient_clipping": config.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},  # 0: dynamic loss scaling
        # The optimizer is the project's AdamW, built by the training loop with per-parameter weight decay.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    accumulation_dtype = knobs.grad_accum_dtype
    if accumulation_dtype == "auto" and precision in ("bf16", "fp16") and knobs.zero_stage >= 1:
        # Accumulating micro-batch gradients in 16 bits loses small updates; keep the sum in fp32. DeepSpeed
        # supports this only under ZeRO (stage 0 refuses the mix).
        accumulation_dtype = "fp32"
    if accumulation_dtype != "auto":
        if knobs.zero_stage == 0 and accumulation_dtype != precision:
            raise ConfigError(
                f"deepspeed.grad_accum_dtype: {accumulation_dtype} differs from the model's {precision}, which"
                " DeepSpeed supports only under ZeRO; use zero_stage 1-3 or grad_accum_dtype=auto"
            )
        ds["data_types"] = {"grad_accum_dtype": accumulation_dtype}
    if knobs.communication_data_type != "auto":
        ds["communication_data_type"] = knobs.communication_data_type
    return ds
