"""GPU memory per rank, known before a run starts: model states (parameters, gradients, optimizer state) by ZeRO
stage, the activations autograd keeps for backward at a micro-batch, and DeepSpeed's communication buffers.

Model states are counted as DeepSpeed's own estimators count them (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`; stages 0 and 1 extend the same accounting). Activations are counted
tensor by tensor from what this project's model and loss save for backward; tests/pretrain/test_memory.py checks
the count against the bytes autograd actually saves, for both blocks and both attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config import Config, DeepSpeedConfig, ModelConfig, gradient_accumulation_dtype
from pretrain.model import GPT, mlp_width

BYTES_PER_ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}
INDEX_BYTES = 8  # token ids, targets and positions are int64
FP32 = 4


@dataclass(frozen=True)
class ParameterCount:
    total: int
    largest_layer: int  # the most parameters one module holds itself: ZeRO-3 gathers one such module at a time


def count_parameters(model: ModelConfig) -> ParameterCount:
    """Exact counts from the model itself, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        gpt = GPT(model)
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in gpt.modules())
    return ParameterCount(gpt.num_parameters(), largest)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one configuration of a run."""

    zero_stage: int
    checkpointing: bool
    micro_batch_size: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.buffers


def accumulates_in_fp32(knobs: DeepSpeedConfig, zero_stage: int, precision: str) -> bool:
    """Whether micro-batch gradients are summed in fp32 beside 16-bit ones."""
    return precision != "fp32" and gradient_accumulation_dtype(knobs, zero_stage, precision) == "fp32"


def model_state_bytes(count: ParameterCount, zero_stage: int, gpus: int, precision: str,
                      fp32_accumulation: bool = False) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) per GPU. In 16-bit training each parameter has 16-bit weights and
    gradients, an fp32 master copy and fp32 gradient, and Adam's two fp32 moments: 2 + 2 + 4 + 4 + 8 bytes. ZeRO-1
    shards the fp32 parts over the GPUs, ZeRO-2 the 16-bit gradients too, and ZeRO-3 the 16-bit weights as well,
    holding whole only the layer in use (its weights and gradients); in fp32 there are no separate master parts.
    ZeRO-1 summing micro-batch gradients in fp32 keeps a whole fp32 accumulator per parameter besides."""
    element = BYTES_PER_ELEMENT[precision]
    master = FP32 if element < FP32 else 0
    total, largest = count.total, count.largest_layer
    shards = 1 if zero_stage == 0 else gpus
    optimizer = 2 * FP32 * total / shards
    if zero_stage <= 1:
        parameters = element * total + master * total / shards
        accumulators = FP32 * total if zero_stage == 1 and fp32_accumulation else 0
        gradients = element * total + master * total / shards + accumulators
    elif zero_stage == 2:
        parameters = element * total + master * total / shards
        gradients = (element + master) * total / shards
    else:  # ZeRO-3 reduces 16-bit gradients straight into the fp32 shard; it keeps no 16-bit gradient shard
        parameters = (element + master) * total / shards + element * largest
        gradients = (master or element) * total / shards + element * largest
    return round(parameters), round(gradients), round(optimizer)


def buffer_bytes(knobs: DeepSpeedConfig, zero_stage: int, precision: str) -> int:
    """DeepSpeed's gradient-reduction buckets, allocated whole whatever the model's size: two of reduce_bucket_size
    elements with overlap_comm (one is filled while the other is reduced), one without; ZeRO-1 stages gradients in
    fp32 when they accumulate in fp32, ZeRO-2 in the model's precision; ZeRO-3 adds its parameter prefetch bucket."""
    element = BYTES_PER_ELEMENT[precision]
    if zero_stage == 0:
        return 0
    if zero_stage == 3:
        return (knobs.reduce_bucket_size + knobs.stage3_prefetch_bucket_size) * element
    staging = FP32 if zero_stage == 1 and accumulates_in_fp32(knobs, zero_stage, precision) else element
    return (2 if knobs.overlap_comm else 1) * knobs.reduce_bucket_size * staging


def norm_bytes(model: ModelConfig, width: int, element: int) -> int:
    """What one norm keeps per row of `width`: LayerNorm its input and two statistics; RMSNorm (PyTorch's
    unfused kernel) an fp32 copy of its input, its fp32 normalized input and one fp32 statistic."""
    if model.block == "llama":
        return 2 * FP32 * width + FP32
    return element * (width + 2)


def math_attention(model: ModelConfig) -> bool:
    """Whether attention runs PyTorch's plain matmul-softmax path, which keeps the probabilities: when the config
    asks for it, or with attention dropout, which the fused CPU kernel lacks (on a GPU this overcounts). Planned for
    GPUs: `auto` is counted as the fused kernel, which a CPU also takes (for bf16 heads of up to 16, on fp32 copies)."""
    return model.attention_kernel == "math" or model.dropout > 0


def block_bytes_per_token(model: ModelConfig, element: int) -> int:
    """What one block keeps per token, besides what grows with the sequence (`block_bytes_per_sequence`)."""
    width, heads, kv_heads = model.d_model, model.n_head, model.kv_heads
    head_dim = width // heads
    queries_and_keys = (heads + kv_heads) * head_dim
    rebuilt_queries = model.position == "rotary" or model.qk_norm
    # The qkv input, the qkv output (q, k and v are views of it) and the attention output.
    attention = element * (width + (heads + 2 * kv_heads) * head_dim + width)
    if math_attention(model) or rebuilt_queries:
        # The output projection's contiguous copy of the attention output. The fused kernel lays its output out
        # like the queries, so for queries that are views of the qkv output the copy is itself a view.
        attention += element * width
    if model.qk_norm:  # the norms of q and k, whose inputs are views of the qkv output
        kept = (heads + kv_heads) * norm_bytes(model, head_dim, element)
        attention += kept - (element * queries_and_keys if model.block == "gpt2" else 0)
    if model.position == "rotary":  # the rotated q and k
        attention += element * queries_and_keys
    if math_attention(model):  # the fp32 attention probabilities of each head (with dropout, its mask and product)
        attention += FP32 * heads * model.seq_len * (3 if model.dropout else 1)
    else:  # the fused kernel's fp32 log-sum-exp per head
        attention += FP32 * heads
    hidden = mlp_width(model)
    # GPT-2: the MLP input, the GELU's input and output; Llama: the input, the gate's output, the SiLU's output,
    # the up-projection's output and their product.
    mlp = element * (width + (4 if model.block == "llama" else 2) * hidden)
    dropout_masks = 2 * element * width if model.dropout else 0  # after attention and after the MLP
    return 2 * norm_bytes(model, width, element) + attention + mlp + dropout_masks


def block_bytes_per_sequence(model: ModelConfig, element: int) -> int:
    """Rotary's cosines and sines, gathered for the positions of each call (q and k), kept by their products."""
    if model.position != "rotary":
        return 0
    return 2 * model.seq_len * (model.d_model // model.n_head) * element


def activation_bytes(config: Config, micro_batch_size: int, precision: str, checkpointing: bool) -> int:
    """The activations autograd holds at the peak of one micro-batch's backward pass: every block's, or with
    activation checkpointing each block's input plus the one block being recomputed; and around the blocks the
    token ids and targets, the final norm, the head's input, and the loss's fp32 logits and log normalizers (which
    its z-loss shares). Counted for 16-bit training; in fp32 it overcounts slightly."""
    model = config.model
    element = BYTES_PER_ELEMENT[precision]
    tokens = micro_batch_size * model.seq_len
    one_block = block_bytes_per_token(model, element) * tokens + block_bytes_per_sequence(model, element)
    if checkpointing:
        blocks = model.n_layer * element * model.d_model * tokens + one_block
    else:
        blocks = model.n_layer * one_block
    around = (
        INDEX_BYTES * (micro_batch_size * (model.seq_len + 1) + tokens + model.seq_len)
        + tokens * (norm_bytes(model, model.d_model, element) + element * model.d_model)
        + tokens * FP32 * (model.vocab_size + 1)
    )
    if model.dropout:  # the embeddings' dropout mask
        around += tokens * element * model.d_model
    return blocks + around


def estimate(config: Config, count: ParameterCount, gpus: int, precision: str, zero_stage: int,
             checkpointing: bool, micro_batch_size: int) -> MemoryEstimate:
    fp32_accumulation = accumulates_in_fp32(config.deepspeed, zero_stage, precision)
    parameters, gradients, optimizer = model_state_bytes(count, zero_stage, gpus, precision, fp32_accumulation)
    return MemoryEstimate(
        zero_stage=zero_stage,
        checkpointing=checkpointing,
        micro_batch_size=micro_batch_size,
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        activations=activation_bytes(config, micro_batch_size, precision, checkpointing),
        buffers=buffer_bytes(config.deepspeed, zero_stage, precision),
    )
