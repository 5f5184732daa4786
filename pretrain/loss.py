"""The training objective, shared by the step, validation, the benchmark and export checks."""

from __future__ import annotations

import torch

from data_pipeline.loader import document_ids


def next_token_loss(model, windows: torch.Tensor, end_of_document_id: int | None,
                    z_loss: float = 0.0) -> torch.Tensor:
    """Mean loss of predicting each window's next tokens. With an end-of-document id, attention stays
    within each document (data.document_masking). With `z_loss`, plus that weight times the mean square of
    each prediction's log normalizer, log(sum(exp(logits))), which holds the logits near zero where a large
    learning rate lets them drift and spike the loss (PaLM, Chowdhery et al. 2022, section 5: 1e-4)."""
    ids = None if end_of_document_id is None else document_ids(windows, end_of_document_id)
    logits = model(windows[:, :-1], ids).float().flatten(0, 1)
    # Cross-entropy as log normalizer minus the target's logit: one pass over the vocabulary serves it and the
    # z-loss (F.cross_entropy and a separate logsumexp took a third of a CPU step's time longer).
    normalizer = torch.logsumexp(logits, dim=-1)
    loss = (normalizer - logits.gather(1, windows[:, 1:].reshape(-1, 1)).squeeze(1)).mean()
    if z_loss:
        loss = loss + z_loss * normalizer.square().mean()
    return loss
