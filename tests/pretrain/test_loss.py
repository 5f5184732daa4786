import pytest
import torch
import torch.nn.functional as F

from pretrain.loss import next_token_loss


class FixedLogits:
    """A model whose logits are given: the loss is then a known function of them."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, inputs, document_ids):
        return self.logits


def test_the_z_loss_adds_its_weight_times_the_mean_squared_log_normalizer():
    torch.manual_seed(0)
    windows = torch.randint(0, 11, (2, 6))
    logits = torch.randn(2, 5, 11)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert next_token_loss(FixedLogits(logits), windows, None) == pytest.approx(cross_entropy.item())
    squared = torch.logsumexp(logits, dim=-1).square().mean()
    assert next_token_loss(FixedLogits(logits), windows, None, z_loss=1e-2) == pytest.approx(
        (cross_entropy + 1e-2 * squared).item())
    # Shifting every logit leaves the predictions, and so the cross-entropy, as they were; only the z-loss sees it.
    shifted = next_token_loss(FixedLogits(logits + 5.0), windows, None, z_loss=1e-2)
    assert shifted > next_token_loss(FixedLogits(logits), windows, None, z_loss=1e-2) + 0.1
