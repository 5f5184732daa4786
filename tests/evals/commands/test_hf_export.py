"""Every exported architecture computes the project's GPT exactly: GPT-2 for learned positions, GPT-NeoX for
rotary ones, Llama for the Llama-style block (grouped-query or not, tied or not), with and without the biases
the project can leave out; with QK-norm, Persimmon for the GPT-2 block and Qwen3 for the Llama one."""

from pathlib import Path

import pytest
import torch

from evals.commands.hf_export import ExportError, to_hf
from pretrain.config import ModelConfig, load_config
from pretrain.model import GPT

LLAMA = {"block": "llama", "position": "rotary", "rotary_base": 500.0, "mlp_multiple_of": 16}
QUICKSTART = Path(__file__).resolve().parents[3] / "configs" / "quickstart.yaml"


def perturbed(model: GPT) -> GPT:
    """Every weight, biases and norms included, moved off its initial value, so a wrong mapping cannot pass."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


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
    model = perturbed(GPT(ModelConfig(vocab_size=300, seq_len=64, n_layer=2, n_head=4, d_model=32, **shape)))
    hf_model = to_hf(model, end_of_document_id=0)
    assert type(hf_model).__name__ == architecture
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf_model(tokens).logits, atol=1e-5, rtol=0)


def saved_and_loaded_back(model: GPT, directory: Path):
    """The model as `transformers` reads it from an exported directory, not the object the export built."""
    from transformers import AutoModelForCausalLM

    to_hf(model, end_of_document_id=0).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize(("shape", "architecture"), [
    ({"position": "rotary", "qk_norm": True}, "PersimmonForCausalLM"),
    ({"position": "rotary", "qk_norm": True, "bias": True, "tie_embeddings": False, "rotary_base": 500.0},
     "PersimmonForCausalLM"),
    ({**LLAMA, "qk_norm": True}, "Qwen3ForCausalLM"),
    ({**LLAMA, "qk_norm": True, "n_kv_head": 2, "tie_embeddings": False}, "Qwen3ForCausalLM"),
])
def test_a_model_with_qk_norm_loaded_from_its_export_gives_the_projects_logits(shape, architecture, tmp_path):
    torch.manual_seed(0)
    model = perturbed(GPT(ModelConfig(vocab_size=300, seq_len=64, n_layer=2, n_head=4, d_model=32, **shape)))
    hf_model = saved_and_loaded_back(model, tmp_path / "hf")
    assert type(hf_model).__name__ == architecture
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)


def test_the_quickstart_model_exports_and_loads_with_the_same_logits(tmp_path):
    config = load_config(QUICKSTART).model
    assert config.qk_norm  # the point of this test: the default run is exportable
    torch.manual_seed(0)
    model = perturbed(GPT(config))
    hf_model = saved_and_loaded_back(model, tmp_path / "hf")
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("shape", "setting"), [({"position": "learned", "qk_norm": True}, "model.qk_norm"),
                                                 ({**LLAMA, "qk_norm": True, "bias": True}, "model.bias"),
                                                 ({"position": "rotary", "n_kv_head": 2}, "model.n_kv_head"),
                                                 ({"position": "rotary", "n_kv_head": 2, "qk_norm": True},
                                                  "model.n_kv_head")])
def test_a_model_transformers_cannot_express_is_refused_naming_the_setting(shape, setting):
    model = GPT(ModelConfig(vocab_size=300, seq_len=64, n_layer=1, n_head=4, d_model=32, **shape))
    with pytest.raises(ExportError, match=rf"^{setting}:"):
        to_hf(model, end_of_document_id=0)
