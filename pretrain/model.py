"""A decoder-only GPT in plain PyTorch: token ids in, next-token logits out. No distributed code here.

Each block is pre-norm: tokens communicate (causal self-attention), then compute (an MLP), each added back to
the residual stream. Two blocks: GPT-2's (LayerNorm, a 4x GELU MLP) and Llama's (RMSNorm, a SwiGLU MLP of
8/3 the width, with rotary positions); either may share keys and values between query heads (grouped-query
attention), and tie the output head to the token embedding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.config import ModelConfig

MLP_RATIO = 4
NORM_EPS = 1e-5


def norm(config: ModelConfig, width: int | None = None) -> nn.Module:
    width = width or config.d_model
    if config.block == "llama":
        return nn.RMSNorm(width, eps=NORM_EPS)
    return nn.LayerNorm(width, eps=NORM_EPS, bias=config.bias)


def mlp_width(config: ModelConfig) -> int:
    """The MLP's hidden width: 4 x d_model (GPT-2), or 8/3 x d_model rounded up to mlp_multiple_of (Llama, whose
    three matrices then hold as many weights as GPT-2's two)."""
    if config.block == "gpt2":
        return MLP_RATIO * config.d_model
    return config.mlp_multiple_of * math.ceil(int(8 * config.d_model / 3) / config.mlp_multiple_of)


class Rotary(nn.Module):
    """Rotary position embedding: rotates pairs of query/key features by position-dependent angles."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        inverse_frequency = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inverse_frequency)
        # Derivable from the config, so not saved in checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, time, head_dim); positions: (time,) or (batch, time)."""
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # the same angles for every head
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


def float32_is_faster(queries: torch.Tensor) -> bool:
    """PyTorch's CPU attention kernels are slow in bf16 for small heads: for heads of 16, attention in fp32 (the
    flash kernel) took 0.52x the time of the bf16 math kernel and 0.22x that of bf16 flash (BENCHMARKS.md,
    "Attention kernel on a CPU")."""
    return queries.device.type == "cpu" and queries.dtype == torch.bfloat16 and queries.shape[-1] <= 16


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.d_model // config.n_head
        self.dropout = config.dropout
        # Queries of every head, then keys, then values, in one matmul.
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.rotary = (
            Rotary(self.head_dim, config.seq_len, config.rotary_base) if config.position == "rotary" else None
        )
        self.q_norm = norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = norm(config, self.head_dim) if config.qk_norm else None
        self.math_kernel = config.attention_kernel == "math"

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None, keep: list | None = None,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (part.view(batch, length, -1, self.head_dim).transpose(1, 2) for part in self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if keep is not None:
            keep.append((k, v))
        if prefix is not None:  # keys and values computed earlier, shared by every row of the batch
            k = torch.cat((prefix[0].expand(batch, -1, -1, -1), k), dim=2)
            v = torch.cat((prefix[1].expand(batch, -1, -1, -1), v), dim=2)
        dropout = self.dropout if self.training else 0.0
        dtype = q.dtype
        upcast = not self.math_kernel and float32_is_faster(q)
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        # Without a mask, is_causal lets SDPA pick its fastest (flash) kernel. Autocast would cast an upcast back.
        with (sdpa_kernel(SDPBackend.MATH) if self.math_kernel else contextlib.nullcontext(),
              torch.autocast(q.device.type, enabled=False) if upcast else contextlib.nullcontext()):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.to(dtype).transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    """GPT-2's: up, GELU, down."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, mlp_width(config), bias=config.bias)
        self.proj = nn.Linear(mlp_width(config), config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(nn.Module):
    """Llama's: a SiLU-gated product of two up-projections, then down (Shazeer 2020, "GLU Variants Improve
    Transformer")."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(config.d_model, mlp_width(config), bias=config.bias)
        self.up = nn.Linear(config.d_model, mlp_width(config), bias=config.bias)
        self.proj = nn.Linear(mlp_width(config), config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = norm(config)
        self.mlp = SwiGLU(config) if config.block == "llama" else MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, prefix=None,
                keep: list | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask, positions, prefix, keep))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, checkpoint_blocks: Callable | None = None):
        """checkpoint_blocks: an activation-checkpointing function, called as checkpoint_blocks(block, *inputs),
        that recomputes each block's activations in the backward pass instead of keeping them (the training
        loop passes DeepSpeed's; None keeps activations)."""
        super().__init__()
        self.config = config
        self.checkpoint_blocks = checkpoint_blocks
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.seq_len, config.d_model) if config.position == "learned" else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections that write into the residual stream are scaled by
        # 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        tokens: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep: list | None = None,
    ) -> torch.Tensor:
        """tokens: (batch, time) int64, time <= seq_len. Returns logits (batch, time, vocab_size), or with
        logits_at (batch, n) the logits at those time indices only (batch, n, vocab_size): the output head is
        a large share of the work when only a few positions are scored.

        By default token t sits at position t and attends to tokens 0..t. Otherwise:
        - document_ids (batch, time): a token attends only to earlier tokens of its own document, so documents
          packed into one window do not see each other;
        - positions (batch, time) and attention_mask (batch, time, time), True where a token may attend: any
          layout, e.g. several continuations packed after one shared prompt, each at the positions it would
          have right after the prompt and seeing only the prompt and itself (the few-shot scorer's trick);
        - prefix: each layer's (keys, values), (1 or batch, kv_heads, prefix, head_dim) after QK-norm and
          rotation, of tokens run before (`keep` of an earlier call), attended to as if they came first;
          attention_mask is then (batch, time, prefix + time). The few-shot scorer runs the examples that many
          prompts share once this way.
        - keep: an empty list, filled with this call's (keys, values) per layer.
        """
        length = tokens.shape[1]
        if positions is None:
            if length > self.config.seq_len:
                raise ValueError(f"sequence of {length} tokens is longer than model.seq_len={self.config.seq_len}")
            positions = torch.arange(length, device=tokens.device)
        elif int(positions.max()) >= self.config.seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond model.seq_len={self.config.seq_len}")
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        x = self.dropout(x)
        if document_ids is not None and attention_mask is not None:
            raise ValueError("pass document_ids or attention_mask, not both")
        mask = None if attention_mask is None else attention_mask[:, None]
        if document_ids is not None:
            causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
            mask = (causal & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]
        for number, block in enumerate(self.blocks):
            if self.checkpoint_blocks and self.training:
                x = self.checkpoint_blocks(block, x, mask, positions)
            else:
                x = block(x, mask, positions, prefix[number] if prefix else None, keep)
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.final_norm(x))

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Distinct parameters (a tied head counts once). Without embeddings: no token or position table, and no
        output head (untied, it is a table of the same shape)."""
        total = sum(p.numel() for p in self.parameters())
        if include_embeddings:
            return total
        tables = [self.token_embedding, self.position_embedding, None if self.config.tie_embeddings else self.head]
        return total - sum(table.weight.numel() for table in tables if table is not None)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per weight that multiplies an activation, plus attention.

        Forward is 2 FLOPs per weight per token and backward twice that, hence 6N, where N counts the
        non-embedding parameters and the output head (a real matmul, tied or not). Attention scores and the
        weighted sum of values add 2 x 2 x seq_len x d_model per layer forward, 12 x that forward and backward
        (PaLM, Chowdhery et al. 2022, appendix B; it does not halve for the causal mask, nor shrink with shared
        key and value heads, as every query head still scores every position). Norms and activations, a few
        FLOPs per width, are left out, as in PaLM's count.
        """
        config = self.config
        matmul_weights = self.num_parameters(include_embeddings=False) + config.vocab_size * config.d_model
        attention = 12 * config.n_layer * config.seq_len * config.d_model
        return 6 * matmul_weights + attention
