import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model import GPT, float32_is_faster

LLAMA = {"block": "llama", "position": "rotary"}


@pytest.mark.parametrize("shape", [{"position": "learned"}, {"position": "rotary"}, {**LLAMA, "n_kv_head": 1},
                                   {**LLAMA, "qk_norm": True}])
def test_changing_a_future_token_never_changes_an_earlier_logit(shape):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, seq_len=16, n_layer=2, n_head=2, d_model=32, **shape)).eval()
    tokens = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        before = model(tokens)
        for position_changed in (5, 15):
            changed = tokens.clone()
            changed[:, position_changed] = (changed[:, position_changed] + 1) % 97
            after = model(changed)
            assert torch.equal(before[:, :position_changed], after[:, :position_changed])
            assert not torch.allclose(before[:, position_changed:], after[:, position_changed:])


def test_rotary_positions_make_the_model_order_aware():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, seq_len=8, n_layer=1, n_head=2, d_model=16, position="rotary")).eval()
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        last_logits = model(tokens)[0, -1]
        swapped_logits = model(tokens[:, [1, 0, 2, 3]])[0, -1]
    assert not torch.allclose(last_logits, swapped_logits)


def test_flops_per_token_matches_a_hand_count():
    # d=8, 2 layers, vocab 16, context 4, no biases, learned positions.
    model = GPT(ModelConfig(vocab_size=16, seq_len=4, n_layer=2, n_head=2, d_model=8))
    # Per layer: qkv 8x24=192, attention output 8x8=64, MLP 8x32 + 32x8 = 512 -> 768 matrix weights,
    # plus two LayerNorm gains of 8 = 784. Two layers and the final norm gain: 2*784 + 8 = 1576.
    assert model.num_parameters(include_embeddings=False) == 1576
    # With the token table (16x8=128, shared with the head) and the position table (4x8=32).
    assert model.num_parameters() == 1576 + 128 + 32
    # 6 x (non-embedding weights + the head's 128 weights) + attention 12 x layers x context x width.
    assert model.flops_per_token() == 6 * (1576 + 128) + 12 * 2 * 4 * 8 == 10992


def test_the_llama_blocks_parameters_and_flops_match_a_hand_count():
    # d=8, 2 query heads of 4 sharing 1 key/value head, 2 layers, vocab 16, context 4, untied head.
    model = GPT(ModelConfig(vocab_size=16, seq_len=4, n_layer=2, n_head=2, d_model=8, n_kv_head=1,
                            mlp_multiple_of=16, tie_embeddings=False, **LLAMA))
    # Per layer: q 8x8 + k 8x4 + v 8x4 = 128, output 8x8 = 64; SwiGLU width int(8 x 8 / 3) = 21 rounded up to
    # 32, three matrices 3 x 8 x 32 = 768; two RMSNorm gains of 8 -> 976. Two layers and the final gain: 1960.
    assert model.num_parameters(include_embeddings=False) == 1960
    assert model.num_parameters() == 1960 + 128 + 128  # the token table and the untied head
    assert model.flops_per_token() == 6 * (1960 + 128) + 12 * 2 * 4 * 8 == 13296


def test_query_heads_in_a_group_attend_with_their_shared_key_and_value_head():
    """4 query heads over 2 key/value heads (heads 0-1 share one, 2-3 the other) compute what 4 full heads do
    whose keys and values are copied so."""
    torch.manual_seed(0)
    shape = {"vocab_size": 50, "seq_len": 8, "n_layer": 1, "n_head": 4, "d_model": 16, **LLAMA}
    grouped, full = GPT(ModelConfig(**shape, n_kv_head=2)).eval(), GPT(ModelConfig(**shape)).eval()
    assert grouped.blocks[0].attn.qkv.weight.shape == (16 + 2 * 2 * 4, 16)
    state = grouped.state_dict()
    q, k, v = state["blocks.0.attn.qkv.weight"].split([16, 8, 8])

    def each_head_twice(rows: torch.Tensor) -> torch.Tensor:  # 2 heads of 4 rows -> heads 0, 0, 1, 1
        return rows.view(2, 4, 16).repeat_interleave(2, dim=0).reshape(16, 16)

    state["blocks.0.attn.qkv.weight"] = torch.cat([q, each_head_twice(k), each_head_twice(v)])
    full.load_state_dict(state)
    tokens = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.allclose(grouped(tokens), full(tokens), atol=1e-6)


@pytest.mark.parametrize(("shape", "message"), [
    ({"n_head": 4, "n_kv_head": 3}, "n_head=4 is not divisible by n_kv_head=3"),
    ({"block": "llama", "position": "learned"}, "block llama needs position: rotary"),
])
def test_a_model_shape_that_cannot_be_built_is_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(d_model=16, **shape)


def test_output_head_is_tied_to_the_token_embedding():
    model = GPT(ModelConfig(vocab_size=32, seq_len=4, n_layer=1, n_head=1, d_model=8))
    assert model.head.weight is model.token_embedding.weight


def test_residual_projections_start_smaller_with_depth():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, seq_len=8, n_layer=8, n_head=4, d_model=256))
    residual_std = model.blocks[0].mlp.proj.weight.std().item()
    other_std = model.blocks[0].mlp.fc.weight.std().item()
    assert residual_std == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 x 8 layers)
    assert other_std == pytest.approx(0.02, rel=0.05)


def test_a_sequence_longer_than_the_context_is_refused():
    model = GPT(ModelConfig(vocab_size=32, seq_len=4, n_layer=1, n_head=1, d_model=8))
    with pytest.raises(ValueError, match="model.seq_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_with_document_ids_no_token_sees_another_document():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, seq_len=12, n_layer=2, n_head=2, d_model=16)).eval()
    tokens = torch.randint(0, 50, (2, 12))
    documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    with torch.no_grad():
        before = model(tokens, documents)
        changed = tokens.clone()
        changed[:, 2] = (changed[:, 2] + 1) % 50  # inside the first document of both rows
        after = model(changed, documents)
        # Row 0: the second document (positions 5..) never saw position 2; row 1 is one document and did.
        assert torch.equal(before[0, 5:], after[0, 5:])
        assert not torch.allclose(before[1, 5:], after[1, 5:])
        # A window that is one document gives what the plain causal model gives.
        assert torch.allclose(model(tokens[1:], documents[1:]), model(tokens[1:]), atol=1e-6)


def test_checkpointed_blocks_give_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, seq_len=8, n_layer=2, n_head=2, d_model=16)
    plain = GPT(config)
    calls = []

    def checkpoint(block, *inputs):
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)

    checkpointed = GPT(config, checkpoint_blocks=checkpoint)
    checkpointed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 40, (2, 8))
    for model in (plain, checkpointed):
        model(tokens).square().mean().backward()
    assert len(calls) == 2
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(plain.parameters(), checkpointed.parameters()))


@pytest.mark.parametrize("weights", ["fp32", "bf16 autocast", "bf16"])
def test_the_math_attention_kernel_gives_the_same_outputs_and_gradients(weights):
    # Heads of 8: in bf16 on a CPU, `auto` computes attention in fp32, so this also checks that path against math.
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, seq_len=16, n_layer=2, n_head=8, d_model=64, position="rotary")
    auto, math = GPT(config), GPT(config.model_copy(update={"attention_kernel": "math"}))
    math.load_state_dict(auto.state_dict())
    if weights == "bf16":  # as DeepSpeed trains in bf16: the weights themselves in bf16, no autocast
        auto, math = auto.to(torch.bfloat16), math.to(torch.bfloat16)
    tokens = torch.randint(0, 40, (4, 16))
    outputs = []
    for model in (auto, math):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "bf16 autocast"):
            logits = model(tokens)
        logits.float().square().mean().backward()
        outputs.append(logits.float())
    tolerance = 1e-5 if weights == "fp32" else 3e-2
    assert torch.allclose(outputs[0], outputs[1], atol=tolerance)
    assert all(torch.allclose(a.grad.float(), b.grad.float(), atol=tolerance)
               for a, b in zip(auto.parameters(), math.parameters()))


def test_auto_attention_computes_in_fp32_only_where_it_was_measured_faster():
    # bf16 heads of up to 16 dimensions on a CPU (BENCHMARKS.md, "Attention kernel on a CPU"); elsewhere attention
    # runs in the precision it is given.
    assert float32_is_faster(torch.zeros(2, 8, 4, 16, dtype=torch.bfloat16))
    assert not float32_is_faster(torch.zeros(2, 8, 4, 16, dtype=torch.float32))
    assert not float32_is_faster(torch.zeros(2, 8, 4, 64, dtype=torch.bfloat16))
