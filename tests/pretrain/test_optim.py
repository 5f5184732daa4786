import pytest
import torch

from pretrain.config import ModelConfig, TrainConfig
from pretrain.model import GPT
from pretrain.optim import lr_multiplier, parameter_groups


def test_warmup_rises_linearly_then_cosine_decays_to_the_floor():
    train = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    multipliers = [lr_multiplier(step, train) for step in range(110)]
    assert multipliers[0] == pytest.approx(0.1) and multipliers[9] == pytest.approx(1.0)
    assert multipliers[60] == pytest.approx(0.55)  # halfway through the decay: midway between 1 and 0.1
    assert multipliers[109] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(multipliers[9:], multipliers[10:]))


def test_weight_decay_applies_to_matrices_only():
    model = GPT(ModelConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=8, bias=True))
    decayed, not_decayed = parameter_groups(model, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in not_decayed["params"])
    assert sum(p.numel() for group in (decayed, not_decayed) for p in group["params"]) == model.num_parameters()
    torch.optim.AdamW([decayed, not_decayed])  # every parameter appears exactly once


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    train = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    multipliers = [lr_multiplier(step, train) for step in range(100)]
    assert multipliers[9] == 1.0 and set(multipliers[10:81]) == {1.0}
    assert multipliers[90] == pytest.approx(0.55) and multipliers[99] == pytest.approx(0.145)


def test_wsd_runs_of_different_lengths_share_their_stable_phase():
    # So one stable run can be branched into decays for several token budgets.
    short = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    long = TrainConfig(max_steps=300, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert [lr_multiplier(s, short) for s in range(80)] == [lr_multiplier(s, long) for s in range(80)]
