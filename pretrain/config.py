"""The one typed config of a run: loaded from YAML, overridden from the command line, validated.

Each lower package owns its section (`data_pipeline.config.DataConfig`, `evals.config.FewShotConfig`); this
module composes them with the model, train, deepspeed, eval, faults, launch and logging sections. Every entry
point goes through `load_config`; bad input raises `ConfigError`, one line naming the field (exit code 2).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

from data_pipeline.common.errors import ConfigError
from data_pipeline.common.redaction import looks_secret, redacted_tree
from data_pipeline.config import (
    BatchLayout,
    DataConfig,
    Section,
    read_yaml_mapping,
    set_dotted,
    validated,
)
from evals.config import FewShotConfig


class ModelConfig(Section):
    vocab_size: int = Field(2048, ge=2, le=2**31 - 1)
    seq_len: int = Field(128, ge=1, description="context length in tokens")
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=1)
    position: Literal["learned", "rotary"] = "learned"
    attention_kernel: Literal["auto", "math"] = Field(
        "auto", description="auto: PyTorch's choice (flash where it can), in fp32 for bf16 heads of up to 16"
        " dimensions on a CPU, where that is faster; math: the plain matmul-softmax path always"
        " (BENCHMARKS.md, \"Attention kernel on a CPU\")"
    )
    rotary_base: float = Field(10000.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    block: Literal["gpt2", "llama"] = Field(
        "gpt2", description="gpt2: LayerNorm and a 4 x d_model GELU MLP; llama: RMSNorm and a SwiGLU MLP (with"
        " position: rotary)"
    )
    n_kv_head: int | None = Field(
        None, ge=1, description="heads of keys and values, each shared by n_head / n_kv_head query heads"
        " (grouped-query attention); None: n_head"
    )
    mlp_multiple_of: int = Field(
        64, ge=1, description="llama: the SwiGLU MLP's width, 8/3 x d_model, rounded up to a multiple of this"
    )
    tie_embeddings: bool = Field(True, description="the output head shares the token embedding's weights")
    qk_norm: bool = Field(False, description="the block's norm on each head's queries and keys before attention")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.block == "llama" and self.position != "rotary":
            raise ValueError("block llama needs position: rotary")
        if self.position == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError("rotary positions need an even head dimension (d_model / n_head)")
        return self


class TrainConfig(Section):
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
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="Adam's decay rates of its moment estimates, each in [0, 1)"
    )
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    z_loss: float = Field(
        0.0, ge=0, description="weight of the squared log normalizer of the logits added to the training loss"
        " (PaLM used 1e-4): it keeps the logits small; train/loss includes it, val/loss does not"
    )
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints; one is always written at the end")
    checkpoint_steps: list[Annotated[int, Field(ge=1)]] = Field(
        [], description="steps to checkpoint at besides every checkpoint_every: where a WSD run's decay branches start"
    )
    keep_checkpoints: int = Field(
        0, ge=0, description="complete checkpoints kept, newest first, besides those of checkpoint_steps; 0 keeps all"
    )
    resume: Literal["auto", "never"] = "auto"
    data_order_change: Literal["refuse", "continue_by_tokens"] = Field(
        "refuse", description="a resume with another global_batch_tokens, model.seq_len, seed, data.shuffle_blocks or"
        " data.mix_shards than the checkpoint's would skip or repeat data: refuse it, or continue after the same"
        " number of tokens seen, in the order the new settings give",
    )
    branch_from: str | None = Field(
        None, description="a complete checkpoint of another run to start from (weights, optimizer, data position,"
        " step), when this run has none of its own: with schedule wsd, a decay branch of that run's stable phase"
    )


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the device supports it, fp32 otherwise; fp16 uses dynamic loss scaling"
    )
    timeout_minutes: float = Field(10, gt=0, description="how long a collective waits for a missing rank")
    startup_timeout_minutes: float = Field(
        24 * 60, gt=0, description="how long the other ranks wait for rank 0's start-up work (preparing and"
        " verifying the data, converting a checkpoint), which can take hours on a large corpus",
    )
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


class FaultsConfig(Section):
    max_consecutive_skipped_steps: int = Field(
        10, ge=1, description="steps in a row with a non-finite loss or gradient (each skipped) before the run stops"
    )
    nan_loss_at_steps: list[Annotated[int, Field(ge=1)]] = Field(
        [], description="drill: rank 0's loss at these steps is made NaN, to rehearse the non-finite guard"
    )
    spike_factor: float = Field(
        1.5, gt=1.0, description="train/loss_spikes counts steps whose loss is above this many times the lowest of"
        " the spike_window steps before"
    )
    spike_window: int = Field(100, ge=1, description="steps whose lowest loss a step's loss is compared with")


class EvalConfig(Section):
    interval: int = Field(250, ge=0, description="steps between validation-loss evaluations; 0: only at the end")
    batches: int = Field(4, ge=1, description="validation micro-batches per rank at each evaluation")
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig)


class LoggingConfig(Section):
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


class SlurmConfig(Section):
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


class LaunchConfig(Section):
    environment: dict[Annotated[str, Field(pattern=ENVIRONMENT_NAME)], str] = Field(
        {}, description="environment variables for every rank (NCCL settings and the like; never secrets)"
    )
    rendezvous_port: int = Field(29500, ge=1024, le=65535, description="multi-node: the c10d rendezvous port")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def no_secrets(self) -> LaunchConfig:
        secrets = sorted(name for name in self.environment if looks_secret(name))
        if secrets:
            raise ValueError(
                f"{', '.join(secrets)} looks like a secret, and the config is written to the run directory, the"
                " launch records and W&B; export it in the environment you launch or submit from instead (torchrun"
                " and SLURM pass it on to every rank)"
            )
        return self


class Config(Section):
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

    def redacted_dump(self) -> dict[str, Any]:
        """The config as the run directory and W&B keep it: credentials in values (a signed data.shard_url, a
        password in a pipe: command) replaced by data_pipeline.common.redaction.REDACTED. The ranks never read it back;
        they load the config file and overrides they were started with."""
        return redacted_tree(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.redacted_dump(), sort_keys=False)

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


def merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new tree: `base` with `top` merged in, section by section (a list, such as data.sources, is replaced
    whole); neither input is modified."""
    result = copy.deepcopy(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = merged(result[key], value) if both_sections else copy.deepcopy(value)
    return result


def read_config_tree(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's tree, with the files its `include:` list names (relative to it) merged in first, in
    order, and its own settings on top: a run preset composes a model shape, a data recipe and a schedule."""
    if path.resolve() in including:
        raise ConfigError(f"{path}: includes itself (through {' -> '.join(str(p) for p in including)})")
    tree = read_yaml_mapping(path, "config")
    includes = tree.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(name, str) for name in includes):
        raise ConfigError(f"{path}: include: must be a list of config files, relative to this one")
    composed: dict[str, Any] = {}
    for name in includes:
        composed = merged(composed, read_config_tree(path.parent / name, (*including, path.resolve())))
    return merged(composed, tree)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config and what it includes (or start from the defaults), apply `a.b=value` overrides,
    validate. A config file that names no run is named after the file (configs/models/llama-60m.yaml runs as
    llama-60m) and, naming no data directory either, prepares its data in data/<file name>, so that no two shipped
    configs share a run directory or a dataset."""
    tree = read_config_tree(Path(path)) if path is not None else {}
    for override in overrides:
        set_dotted(tree, override)
    if path is not None:
        stem = Path(path).stem
        tree.setdefault("name", stem)
        data = tree.setdefault("data", {})
        if isinstance(data, dict):
            data.setdefault("dir", f"data/{stem}")
    return validated(Config, tree)


def gradient_accumulation_dtype(knobs: DeepSpeedConfig, zero_stage: int, precision: str) -> str:
    """What micro-batch gradients are summed in at `zero_stage`: deepspeed.grad_accum_dtype, whose auto means fp32
    under ZeRO 1-3 with bf16 or fp16 (summing in 16 bits loses small updates; DeepSpeed supports the mix only under
    ZeRO) and stays auto, the model's dtype, otherwise."""
    if knobs.grad_accum_dtype == "auto" and precision in ("bf16", "fp16") and zero_stage >= 1:
        return "fp32"
    return knobs.grad_accum_dtype


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
    accumulation_dtype = gradient_accumulation_dtype(knobs, knobs.zero_stage, precision)
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
