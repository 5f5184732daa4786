"""Both exported architectures compute the project's GPT exactly: GPT-2 for learned positions, GPT-NeoX for
rotary ones, with and without the biases the project can leave out."""

import pytest
import torch

from evals.interop import to_hf
from pretrain.config import ModelConfig
from pretrain.model import GPT


@pytest.mark.parametrize(("position", "bias", "architecture"), [
    ("learned", False, "GPT2LMHeadModel"),
    ("learned", True, "GPT2LMHeadModel"),
    ("rotary", False, "GPTNeoXForCausalLM"),
    ("rotary", True, "GPTNeoXForCausalLM"),
])
def test_the_transformers_model_gives_the_projects_logits(position, bias, architecture):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, seq_len=64, n_layer=2, n_head=4, d_model=32, position=position,
                            bias=bias)).eval()
    with torch.no_grad():  # move every weight, biases and norms included, off its initial value
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    hf_model = to_hf(model, end_of_document_id=0)
    assert type(hf_model).__name__ == architecture
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf_model(tokens).logits, atol=1e-5, rtol=0)
