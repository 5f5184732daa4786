"""The model shapes the benchmarks time and compare, by name (their dimensions; the configs in configs/models
are the full recipes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int
    micro_batch_size: int  # the default; --micro-batch-size overrides it


# GPT-2's vocabulary (50257) padded to a multiple of 64, as is usual for fast matrix products.
SHAPES = {
    "tiny": Shape(n_layer=2, n_head=4, d_model=64, seq_len=64, vocab_size=512, micro_batch_size=8),
    "gpt2-124m": Shape(n_layer=12, n_head=12, d_model=768, seq_len=1024, vocab_size=50304, micro_batch_size=16),
    "gpt2-350m": Shape(n_layer=24, n_head=16, d_model=1024, seq_len=1024, vocab_size=50304, micro_batch_size=16),
}
