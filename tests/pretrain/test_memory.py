import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from torch.utils.checkpoint import checkpoint

from pretrain.config import Config, ModelConfig
from pretrain.loss import next_token_loss
from pretrain.memory import activation_bytes, count_parameters, model_state_bytes
from pretrain.model import GPT


class SavedBytes:
    """The bytes autograd saves for backward while the context is open: each distinct storage once, leaving out
    the parameters (held anyway)."""

    def __init__(self, model: torch.nn.Module):
        self.held = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.held:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


# Heads of 32 dimensions: `auto` then takes the fused kernel in the weights' precision on a CPU too, as on a GPU
# (pretrain.model.float32_is_faster).
SHAPES = [  # (micro-batch, seq_len, d_model, n_head, n_layer, vocab)
    (2, 64, 64, 2, 2, 256),
    (4, 128, 128, 4, 3, 512),
    (1, 256, 128, 4, 2, 1024),
]
VARIANTS = [
    {"block": "gpt2", "position": "learned"},
    {"block": "gpt2", "position": "rotary"},
    {"block": "gpt2", "position": "rotary", "qk_norm": True},
    {"block": "gpt2", "position": "learned", "dropout": 0.1},
    {"block": "llama", "position": "rotary"},
    {"block": "llama", "position": "rotary", "n_kv_head": 2},
    {"block": "llama", "position": "rotary", "qk_norm": True},
]


def run_config(variant: dict, kernel: str, shape: tuple, z_loss: float = 0.0) -> Config:
    _, seq_len, d_model, n_head, n_layer, vocab = shape
    model = {**variant, "attention_kernel": kernel, "seq_len": seq_len, "d_model": d_model, "n_head": n_head,
             "n_layer": n_layer, "vocab_size": vocab}
    return Config.model_validate({"model": model, "train": {"z_loss": z_loss}})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_planned_activations_are_within_10_percent_of_what_autograd_saves(variant, kernel, shape):
    micro_batch = shape[0]
    config = run_config(variant, kernel, shape, z_loss=1e-4 if micro_batch == 1 else 0.0)
    torch.manual_seed(0)
    model = GPT(config.model).to(torch.bfloat16).train()
    windows = torch.randint(0, config.model.vocab_size, (micro_batch, config.model.seq_len + 1))
    with SavedBytes(model) as saved:
        next_token_loss(model, windows, None, config.train.z_loss)
    planned = activation_bytes(config, micro_batch, "bf16", checkpointing=False)
    assert planned == pytest.approx(saved.total, rel=0.10)


@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_with_activation_checkpointing_the_plan_holds_each_blocks_input_and_one_block_recomputed(block):
    shape = (4, 128, 128, 4, 4, 512)
    config = run_config({"block": block, "position": "rotary"}, "auto", shape)
    torch.manual_seed(0)

    def recompute(block_module, *inputs):
        return checkpoint(block_module, *inputs, use_reentrant=True)

    model = GPT(config.model, checkpoint_blocks=recompute).to(torch.bfloat16).train()
    windows = torch.randint(0, config.model.vocab_size, (shape[0], config.model.seq_len + 1))
    with SavedBytes(model) as kept_through_forward:
        next_token_loss(model, windows, None)
    x = torch.randn(shape[0], config.model.seq_len, config.model.d_model, dtype=torch.bfloat16, requires_grad=True)
    with SavedBytes(model) as one_block:  # what the recomputation of one block saves, in the backward pass
        model.blocks[0](x, None, torch.arange(config.model.seq_len))
    planned = activation_bytes(config, shape[0], "bf16", checkpointing=True)
    assert planned == pytest.approx(kept_through_forward.total + one_block.total, rel=0.10)
    assert planned < activation_bytes(config, shape[0], "bf16", checkpointing=False) / 2


MODELS = [
    ModelConfig(vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    ModelConfig(vocab_size=32000, seq_len=2048, n_layer=16, n_head=16, d_model=1024, block="llama",
                position="rotary", n_kv_head=4, tie_embeddings=False),
]


@pytest.mark.parametrize("model", MODELS, ids=["gpt2-124m", "llama"])
@pytest.mark.parametrize(("gpus_per_node", "nodes"), [(1, 1), (8, 1), (8, 4)])
def test_model_states_equal_deepspeeds_estimators(model, gpus_per_node, nodes):
    count = count_parameters(model)
    with torch.device("meta"):
        reference = GPT(model)
    assert count.total == reference.num_parameters()
    gpus = gpus_per_node * nodes
    _, zero2 = estimate_zero2_model_states_mem_needs(count.total, gpus_per_node, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(count.total, count.largest_layer, gpus_per_node, nodes,
                                                       cpu_offload=False)
    assert sum(model_state_bytes(count, 2, gpus, "bf16")) == pytest.approx(zero2, abs=2)
    assert sum(model_state_bytes(count, 3, gpus, "bf16")) == pytest.approx(zero3, abs=2)
    # Sharding more never costs more, and stage 0 is 16-bit weights and gradients plus 16 bytes of fp32 state.
    per_stage = [sum(model_state_bytes(count, stage, gpus, "bf16")) for stage in range(4)]
    assert per_stage == sorted(per_stage, reverse=True)
    assert per_stage[0] == 20 * count.total


def test_the_largest_layer_of_gpt2_124m_is_its_token_table():
    count = count_parameters(MODELS[0])
    assert count.largest_layer == 50257 * 768
    assert count.total == pytest.approx(124.4e6, rel=0.01)
