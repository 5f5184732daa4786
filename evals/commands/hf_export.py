"""Hand models and tasks to the tools the field already uses.

- `export_hf`: a checkpoint as a Hugging Face `transformers` model directory (config, safetensors weights,
  tokenizer) that `AutoModelForCausalLM.from_pretrained` loads. The project's GPT is GPT-2's architecture
  when positions are learned (GPT2LMHeadModel) and GPT-NeoX's, sequential residual, when they are rotary
  (GPTNeoXForCausalLM); biases the project leaves out are exported as zeros, which changes nothing. The
  Llama-style block is Llama's (LlamaForCausalLM), whose rotary layout (each head's first half against its
  second) is the project's, so its weights are copied as they are. With QK-norm (a norm on each head's
  queries and keys, before rotary), the GPT-2 block with rotary positions is Persimmon's (PersimmonForCausalLM:
  per-head LayerNorms, NeoX's fused head-by-head projection, the same exact-erf GELU and rotary layout), and
  the Llama-style block is Qwen3's (Qwen3ForCausalLM: per-head RMSNorms, otherwise Llama's names).
- `write_lm_eval_tasks`: few-shot tasks as lm-evaluation-harness local tasks, one per task and k, whose
  documents hold the project's own k-shot prompts (same examples, same order, same delimiters), so both
  tools score exactly the same text. Run them with `--num_fewshot 0`.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from data_pipeline.common.errors import UserError
from data_pipeline.common.files import publish_directory, write_atomically
from data_pipeline.tokenizer import END_OF_DOCUMENT
from pretrain.rundir.reader import load_checkpoint, run_tokenizer


class ExportError(UserError):
    """An export that would overwrite something it did not write."""


def _weights(layer: nn.Module, name: str, convert: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """A layer's weight and bias under `name`; a bias the project leaves out is exported as zeros."""
    bias = layer.bias if getattr(layer, "bias", None) is not None else torch.zeros(layer.weight.shape[0])
    return {f"{name}.weight": convert(layer.weight), f"{name}.bias": convert(bias)}


def _block_weights(model: nn.Module, prefix: str, names: dict[str, str], convert) -> dict[str, torch.Tensor]:
    """Every block's layers, the project's submodule names mapped to `names`, `convert(our name, tensor)` applied."""
    weights = {}
    for number, block in enumerate(model.blocks):
        for ours, theirs in names.items():
            weights |= _weights(block.get_submodule(ours), f"{prefix}{number}.{theirs}",
                                functools.partial(convert, ours))
    return weights


GPT2_BLOCK_NAMES = {
    "attn_norm": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
    "mlp_norm": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj",
}
NEOX_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn.qkv": "attention.query_key_value", "attn.proj": "attention.dense",
    "mlp_norm": "post_attention_layernorm", "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h",
}


def gpt2_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's names for the weights; its Conv1D layers store (in, out), hence the transposes."""
    def transpose_matrices(_: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if tensor.dim() == 2 else tensor

    return {
        "transformer.wte.weight": model.token_embedding.weight,
        "transformer.wpe.weight": model.position_embedding.weight,
        **_weights(model.final_norm, "transformer.ln_f", lambda tensor: tensor),
        "lm_head.weight": model.head.weight,
        **_block_weights(model, "transformer.h.", GPT2_BLOCK_NAMES, transpose_matrices),
    }


PERSIMMON_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn.qkv": "self_attn.query_key_value", "attn.proj": "self_attn.dense",
    "attn.q_norm": "self_attn.q_layernorm", "attn.k_norm": "self_attn.k_layernorm",
    "mlp_norm": "post_attention_layernorm", "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h",
}


def _qkv_head_by_head(model: nn.Module) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """GPT-NeoX and Persimmon lay the fused projection out head by head ([q, k, v] of head 0, then of head 1,
    ...) where the project has all queries, then all keys, then all values."""
    width, heads = model.config.d_model, model.config.n_head

    def convert(ours: str, tensor: torch.Tensor) -> torch.Tensor:
        if ours != "attn.qkv":
            return tensor
        return tensor.reshape(3, heads, width // heads, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)

    return convert


def neox_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """GPTNeoXForCausalLM's names."""
    return {
        "gpt_neox.embed_in.weight": model.token_embedding.weight,
        **_weights(model.final_norm, "gpt_neox.final_layer_norm", lambda tensor: tensor),
        "lm_head.weight": model.head.weight,
        **_block_weights(model, "gpt_neox.layers.", NEOX_BLOCK_NAMES, _qkv_head_by_head(model)),
    }


def persimmon_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PersimmonForCausalLM's names: NeoX's block with a LayerNorm (weight and bias) on each head's queries and
    keys."""
    return {
        "model.embed_tokens.weight": model.token_embedding.weight,
        **_weights(model.final_norm, "model.final_layernorm", lambda tensor: tensor),
        "lm_head.weight": model.head.weight,
        **_block_weights(model, "model.layers.", PERSIMMON_BLOCK_NAMES, _qkv_head_by_head(model)),
    }


def llama_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's names, and Qwen3ForCausalLM's with QK-norm (each head's RMSNorm weights added); their
    query, key and value projections are separate matrices."""
    config = model.config
    kv_width = config.kv_heads * (config.d_model // config.n_head)
    weights = {"model.embed_tokens.weight": model.token_embedding.weight, "model.norm.weight": model.final_norm.weight,
               "lm_head.weight": model.head.weight}
    for number, block in enumerate(model.blocks):
        prefix = f"model.layers.{number}."
        for name, layer in [("self_attn.o_proj", block.attn.proj), ("mlp.gate_proj", block.mlp.gate),
                            ("mlp.up_proj", block.mlp.up), ("mlp.down_proj", block.mlp.proj)]:
            weights |= {f"{prefix}{name}.{kind}": tensor for kind, tensor in layer.named_parameters()}
        for kind, tensor in block.attn.qkv.named_parameters():
            q, k, v = tensor.split([config.d_model, kv_width, kv_width])
            weights |= {f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                        f"{prefix}self_attn.v_proj.{kind}": v}
        weights |= {f"{prefix}input_layernorm.weight": block.attn_norm.weight,
                    f"{prefix}post_attention_layernorm.weight": block.mlp_norm.weight}
        if config.qk_norm:
            weights |= {f"{prefix}self_attn.q_norm.weight": block.attn.q_norm.weight,
                        f"{prefix}self_attn.k_norm.weight": block.attn.k_norm.weight}
    return weights


def refuse_what_transformers_lacks(config) -> None:
    if config.block == "gpt2" and config.kv_heads != config.n_head:
        raise ExportError("model.n_kv_head: GPT-2, GPT-NeoX and Persimmon have no grouped-query attention; export a"
                          " grouped-query model with block: llama")
    if config.block == "gpt2" and config.qk_norm and config.position == "learned":
        raise ExportError("model.qk_norm: no transformers class with learned positions normalizes queries and keys;"
                          " a QK-norm model of the gpt2 block exports with position: rotary (as Persimmon), or train"
                          " without qk_norm")
    if config.block == "llama" and config.qk_norm and config.bias:
        raise ExportError("model.bias: Qwen3, the Llama-style family that normalizes queries and keys, has no MLP"
                          " biases; export a QK-norm model trained with bias: false, or a biased one without qk_norm")


def to_hf(model: nn.Module, end_of_document_id: int):
    """The same network as a `transformers` model, fp32, on the CPU, in eval mode."""
    from transformers import (  # deferred: seconds to import, and only an export needs it
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PersimmonConfig,
        PersimmonForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    config = model.config
    refuse_what_transformers_lacks(config)
    # Read off the network itself: the hidden width of its MLPs and the epsilon of its norms.
    mlp_width, norm_eps = model.blocks[0].mlp.proj.in_features, model.final_norm.eps
    common = {"vocab_size": config.vocab_size, "bos_token_id": end_of_document_id,
              "eos_token_id": end_of_document_id, "tie_word_embeddings": config.tie_embeddings}
    if config.block == "llama":
        llama_like = dict(
            hidden_size=config.d_model, intermediate_size=mlp_width, num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads, hidden_act="silu",
            max_position_embeddings=config.seq_len, rms_norm_eps=norm_eps, attention_bias=config.bias,
            attention_dropout=0.0, rope_theta=config.rotary_base, **common,
        )
        if config.qk_norm:
            hf_model = Qwen3ForCausalLM(Qwen3Config(head_dim=config.d_model // config.n_head, **llama_like))
        else:
            hf_model = LlamaForCausalLM(LlamaConfig(mlp_bias=config.bias, **llama_like))
        weights = llama_state_dict(model)
    elif config.position == "learned":
        hf_config = GPT2Config(
            n_positions=config.seq_len, n_embd=config.d_model, n_layer=config.n_layer, n_head=config.n_head,
            n_inner=mlp_width, activation_function="gelu", layer_norm_epsilon=norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
        hf_model, weights = GPT2LMHeadModel(hf_config), gpt2_state_dict(model)
    else:
        # "gelu" is transformers' exact (erf) GELU, the project's F.gelu.
        neox_like = dict(
            hidden_size=config.d_model, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            intermediate_size=mlp_width, hidden_act="gelu", max_position_embeddings=config.seq_len,
            layer_norm_eps=norm_eps, attention_dropout=0.0, hidden_dropout=0.0, **common,
        )
        if config.qk_norm:  # Persimmon rotates half of each head unless told otherwise; the project all of it
            hf_model = PersimmonForCausalLM(PersimmonConfig(
                qk_layernorm=True, rope_theta=config.rotary_base, partial_rotary_factor=1.0, **neox_like))
            weights = persimmon_state_dict(model)
        else:
            hf_model = GPTNeoXForCausalLM(GPTNeoXConfig(
                rotary_pct=1.0, rotary_emb_base=config.rotary_base, use_parallel_residual=False,
                attention_bias=True, **neox_like))
            weights = neox_state_dict(model)
    missing, unexpected = hf_model.load_state_dict({k: v.detach().float() for k, v in weights.items()}, strict=False)
    # Buffers transformers derives itself (causal masks, rotary frequencies) are the only names left out.
    missing = [name for name in missing if not name.endswith(("attn.bias", "attn.masked_bias", "inv_freq"))]
    if missing or unexpected:
        raise RuntimeError(f"weight names do not line up with transformers: missing {missing}, unexpected {unexpected}")
    return hf_model.eval()


def save_hf(model: nn.Module, tokenizer: Tokenizer, folder: Path) -> None:
    """The model and its tokenizer as one transformers folder: what AutoModelForCausalLM, AutoTokenizer and
    lm-evaluation-harness's `hf` model load."""
    from transformers import PreTrainedTokenizerFast  # deferred: only an export needs transformers loaded

    to_hf(model, tokenizer.token_to_id(END_OF_DOCUMENT)).save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_DOCUMENT, eos_token=END_OF_DOCUMENT,
        model_max_length=model.config.seq_len,
    ).save_pretrained(folder)


def export_hf(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    trained = load_checkpoint(run_dir, step)
    out = out or run_dir / "hf" / trained.tag
    refuse_to_replace(out)
    staging = out.with_name(out.name + ".partial")  # an interrupted export never replaces a good directory
    shutil.rmtree(staging, ignore_errors=True)
    save_hf(trained.model, run_tokenizer(trained.config), staging)
    write_atomically(staging / EXPORT_RECORD, json.dumps({"run_dir": str(run_dir), "step": trained.step}) + "\n")
    if out.exists():
        shutil.rmtree(out)  # an earlier export (refuse_to_replace checked), replaced
    return publish_directory(staging, out)


# Written into every export: what tells an earlier export, which a new one may replace, from anything else.
EXPORT_RECORD = "exported_from.json"


def refuse_to_replace(out: Path) -> None:
    """An existing `out` is replaced only if it is empty or an earlier export; anything else is the user's."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / EXPORT_RECORD).is_file())):
        raise ExportError(
            f"--out: {out} exists and is not an earlier export (it has no {EXPORT_RECORD}); choose a new or empty"
            " directory, or remove it yourself"
        )
