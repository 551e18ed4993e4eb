"""Task metrics."""

from __future__ import annotations

import torch
from torch import nn

from autopeft.data import TokenizedSplit, collate, eval_batches


@torch.inference_mode()
def predict(model: nn.Module, split: TokenizedSplit, *, pad_id: int, batch_size: int = 128,
            device: torch.device | None = None) -> torch.Tensor:
    """Predicted class per row, in the split's order."""
    device = device or torch.device("cpu")
    model.eval()
    predictions = torch.empty(len(split), dtype=torch.long)
    for rows in eval_batches(split.lengths(), batch_size):
        batch = collate(split, rows, pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predictions[rows] = logits.argmax(-1).cpu()
    return predictions


def accuracy(model: nn.Module, split: TokenizedSplit, *, pad_id: int, batch_size: int = 128,
             device: torch.device | None = None) -> float:
    predictions = predict(model, split, pad_id=pad_id, batch_size=batch_size, device=device)
    return float((predictions == split.labels).float().mean())
