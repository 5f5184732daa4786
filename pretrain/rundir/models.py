"""Models a command builds without a run to read: a benchmark shape with random weights, for timing the scorer
and comparing it with other tools, where the weights do not matter."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.model import GPT
from pretrain.shapes import SHAPES

SHAPE_NAMES = sorted(SHAPES)
SHAPE_SEQ_LENS = {name: shape.seq_len for name, shape in SHAPES.items()}  # each shape's context


def untrained_model(shape: str, vocab_size: int, seq_len: int, seed: int = 0) -> nn.Module:
    """The project's GPT at `shape` (pretrain.shapes) with this vocabulary and context, seeded random weights, in
    eval mode on the CPU."""
    dimensions = SHAPES[shape]
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=dimensions.n_layer,
                            n_head=dimensions.n_head, d_model=dimensions.d_model))
    return model.eval()
