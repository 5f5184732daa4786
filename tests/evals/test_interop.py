"""Every exported architecture computes the project's GPT exactly: GPT-2 for learned positions, GPT-NeoX for
rotary ones, Llama for the Llama-style block (grouped-query or not, tied or not), with and without the biases
the project can leave out."""

import pytest
import torch

from evals.interop import ExportError, to_hf
from pretrain.config import ModelConfig
from pretrain.model import GPT

LLAMA = {"block": "llama", "position": "rotary", "rotary_base": 500.0, "mlp_multiple_of": 16}


@pytest.mark.parametrize(("shape", "architecture"), [
    ({"position": "learned"}, "GPT2LMHeadModel"),
    ({"position": "learned", "bias": True, "tie_embeddings": False}, "GPT2LMHeadModel"),
    ({"position": "rotary"}, "GPTNeoXForCausalLM"),
    ({"position": "rotary", "bias": True}, "GPTNeoXForCausalLM"),
    (LLAMA, "LlamaForCausalLM"),
    ({**LLAMA, "n_kv_head": 2, "tie_embeddings": False}, "LlamaForCausalLM"),
    ({**LLAMA, "n_kv_head": 1, "bias": True}, "LlamaForCausalLM"),
])
def test_the_transformers_model_gives_the_projects_logits(shape, architecture):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, seq_len=64, n_layer=2, n_head=4, d_model=32, **shape)).eval()
    with torch.no_grad():  # move every weight, biases and norms included, off its initial value
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    hf_model = to_hf(model, end_of_document_id=0)
    assert type(hf_model).__name__ == architecture
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf_model(tokens).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("shape", "setting"), [({**LLAMA, "qk_norm": True}, "model.qk_norm"),
                                                 ({"position": "rotary", "n_kv_head": 2}, "model.n_kv_head")])
def test_a_model_transformers_cannot_express_is_refused_naming_the_setting(shape, setting):
    model = GPT(ModelConfig(vocab_size=300, seq_len=64, n_layer=1, n_head=4, d_model=32, **shape))
    with pytest.raises(ExportError, match=rf"^{setting}:"):
        to_hf(model, end_of_document_id=0)
