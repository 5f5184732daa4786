"""The training objective, shared by the step, validation, the benchmark and export checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.loader import document_ids


def next_token_loss(model, windows: torch.Tensor, end_of_document_id: int | None) -> torch.Tensor:
    """Mean loss of predicting each window's next tokens. With an end-of-document id, attention stays
    within each document (data.document_masking)."""
    ids = None if end_of_document_id is None else document_ids(windows, end_of_document_id)
    logits = model(windows[:, :-1], ids)
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
