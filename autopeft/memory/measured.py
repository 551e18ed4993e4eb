"""The measured level: two real steps of `autopeft.train.fit` on synthetic full-length batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autopeft.memory.live_bytes import LiveBytes
from autopeft.memory.traced_step import steady_settings


def synthetic_split(rows: int, seq_len: int, *, vocab_size: int, pad_id: int, task_type: str = "SEQ_CLS",
                    num_labels: int = 2, pad_left: bool = False, seed: int = 0) -> Any:
    """`rows` rows of random tokens (never the pad token) as `fit` takes them: full length but for the last
    row, one token shorter. So every batch is `seq_len` wide and has padding, as real batches of varying
    lengths do: models then build their attention mask, which they skip for a batch without padding (and
    which the traced estimate, seeing no values, always builds)."""
    from autopeft.data import TokenizedSplit

    generator = torch.Generator().manual_seed(seed)
    high = max(3, min(vocab_size, 1000))
    ids = torch.randint(1, high, (rows, seq_len), generator=generator)
    ids[ids == pad_id] = pad_id % (high - 1) + 1
    input_ids = ids.tolist()
    input_ids[-1] = input_ids[-1][:-1]
    if task_type == "SEQ_CLS":
        labels: Any = torch.randint(0, num_labels, (rows,), generator=generator)
    else:
        labels = [list(row) for row in input_ids]
    return TokenizedSplit(input_ids, labels, pad_left)


def measure(model: nn.Module, settings: Any, *, seq_len: int, device: str | torch.device = "cpu",
            task_type: str = "SEQ_CLS", num_labels: int = 2, pad_id: int | None = None,
            after_step: Callable[[nn.Module, int], None] | None = None) -> int:
    """The real peak bytes of training `model` (adapter attached) for two steps of `fit` on full-length
    synthetic batches, with the method's `after_step` as a trial runs it: on CUDA
    torch.cuda.max_memory_allocated above what was allocated before the model moved there; on the CPU the
    peak of `LiveBytes`. Trains `model` in place (its weights change)."""
    from autopeft.train import causal_lm_loss, classification_loss, fit

    target = torch.device(device)
    steady = steady_settings(settings)
    if steady.precision == "fp16":
        # An fp16 step skipped for overflow allocates no optimizer state, so two steps may never reach the
        # steady state. The loss scale's value costs no memory: start at 1, where nothing overflows.
        steady = dataclasses.replace(steady, init_loss_scale=1.0)
    config = model.config
    pad = pad_id if pad_id is not None else (config.pad_token_id if config.pad_token_id is not None else 0)
    data = synthetic_split(steady.micro_batch_size * steady.grad_accum_steps, seq_len,
                           vocab_size=int(config.vocab_size), pad_id=pad, task_type=task_type,
                           num_labels=num_labels, pad_left=_pads_left(model, task_type))
    loss_fn = classification_loss if task_type == "SEQ_CLS" else causal_lm_loss

    def run() -> None:
        fit(model, data, steady, pad_id=pad, device=target, loss_fn=loss_fn, after_step=after_step)

    if target.type == "cuda":
        return _cuda_peak(model, target, run)
    tracker = LiveBytes(history=False)
    tracker.add_model(model)
    with tracker:
        run()
    return tracker.peak


def _pads_left(model: nn.Module, task_type: str) -> bool:
    from autopeft.models import pads_left

    return pads_left(model, task_type)


def _cuda_peak(model: nn.Module, device: torch.device, run: Callable[[], None]) -> int:
    model.to("cpu")
    torch.cuda.synchronize(device)
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # allocated again by the step, as in a fresh process
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline
