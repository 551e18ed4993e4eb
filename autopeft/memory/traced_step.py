"""The training step as `autopeft.train.fit` runs it, replayed under a `LiveBytes` tracker in steady state
(the optimizer state made up front, then one step)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.memory.analytic import _param_state_bytes
from autopeft.memory.live_bytes import EXTRAS, GRADIENTS, OPTIMIZER, LiveBytes, _tag_adapter_activations
from autopeft.memory.stand_ins import _AdamW8bitStandIn

STEPS = 2  # the second step is the steady state: optimizer state alive through forward and backward


def steady_settings(settings: Any) -> Any:
    """`settings` cut to what the peak needs: two optimizer steps, at most two accumulated micro-batches."""
    return dataclasses.replace(settings, max_steps=STEPS, grad_accum_steps=min(settings.grad_accum_steps, 2))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _causal_loss_traced(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`autopeft.train.causal_lm_loss` without its target count (a host read, impossible without values)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["labels"].shape[1]:]
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, 0


def _traced_optimizer(params: list[nn.Parameter], settings: Any, foreach: bool,
                      notes: list[str]) -> torch.optim.Optimizer:
    from autopeft.train import build_optimizer

    if settings.optimizer == "adamw_8bit":
        notes.append("adamw_8bit: bitsandbytes cannot run on fake tensors; its state is allocated from the "
                     "exact analytic layout (fp32 moments under 4096 elements, else uint8 moments and "
                     "block absmax)")
        return _AdamW8bitStandIn(params)
    optimizer = build_optimizer(params, settings)
    if foreach and isinstance(optimizer, (torch.optim.AdamW, torch.optim.SGD)):
        for group in optimizer.param_groups:  # what torch picks for real CUDA tensors (not for fake ones)
            group["foreach"] = True
    return optimizer


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values()
            if isinstance(value, torch.Tensor)]


def _traced_optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                           params: list[nn.Parameter], max_grad_norm: float) -> None:
    """`autopeft.train._optimizer_step`; with fp16 loss scaling, the step is taken as if no gradient
    overflowed (reading the overflow flag needs values; the step that runs is the one that allocates)."""
    from autopeft.train import _optimizer_step

    if not scaler.is_enabled():
        _optimizer_step(optimizer, scaler, params, max_grad_norm)
        return
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scaler.update()


@dataclass
class _Workload:
    settings: Any  # autopeft.train.TrainSettings, already cut by `steady_settings`
    seq_len: int
    task_type: str
    num_labels: int
    vocab_size: int
    # Decoders' rows are padded on the left, and their batches carry position ids (data.collate): Llama's rotary
    # tables and GPT-2's position embeddings are then one per row, not one shared (0.2-0.9% of the peak).
    left_padded: bool = False

    def batch(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """A full-length batch (no padding: the longest batch sets the peak). On the meta device without an
        attention mask: models read the mask's values to decide how to use it (the fake mode answers such
        reads, the meta device cannot); the trace then reads a little low, which a rejecting bound allows."""
        rows, width = self.settings.micro_batch_size, self.seq_len
        ids = torch.randint(1, max(2, min(self.vocab_size, 1000)), (rows, width), device=device)
        mask = None if device.type == "meta" else torch.ones(rows, width, dtype=torch.long, device=device)
        labels = (torch.randint(0, self.num_labels, (rows,), device=device) if self.task_type == "SEQ_CLS"
                  else ids.clone())
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.left_padded:  # full-length rows, each counting from 0: a tensor of its own, as collate makes
            batch["position_ids"] = torch.arange(width, device=device).repeat(rows, 1)
        return batch

    def targets(self) -> int:
        per_row = 1 if self.task_type == "SEQ_CLS" else self.seq_len - 1
        return per_row * self.settings.micro_batch_size * self.settings.grad_accum_steps


def _run_traced_steps(model: nn.Module, work: _Workload, device: torch.device, tracker: LiveBytes,
                      notes: list[str], *, foreach: bool, through: str = "optimizer",
                      after_step: Callable[[nn.Module, int], None] | None = None) -> None:
    """`autopeft.train.fit`'s loop on `model` (fake tensors) in steady state, under `tracker`. `foreach`:
    the optimizer takes its multi-tensor path, as torch chooses for real CUDA tensors. `through`: the last
    phase traced. Short of "optimizer", the optimizer state is allocated at its exact size and the step is
    not run (its own temporaries are left out: a lower bound, at a fraction of the operations); "forward"
    stops before the backward pass. The method's `after_step` runs either way, so what it keeps is counted."""
    from autopeft.train import _enable_checkpointing, classification_loss

    settings = work.settings
    if settings.gradient_checkpointing:
        _enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _traced_optimizer(params, settings, foreach, notes)
    scaler = torch.amp.GradScaler(device.type, init_scale=settings.init_loss_scale,
                                  enabled=settings.precision == "fp16")
    loss_fn = classification_loss if work.task_type == "SEQ_CLS" else _causal_loss_traced
    model.train()
    tracker.add_model(model)
    with tracker, _tag_adapter_activations(model, tracker):
        scaler.scale(torch.zeros((), device=device))  # fp16: the loss scale exists from the first backward
        tracker.phase = "optimizer"
        bookkeeping = functools.partial(_method_bookkeeping, after_step, model, tracker)
        state = _steady_optimizer_state(optimizer, scaler, params, settings, device, through == "optimizer",
                                        bookkeeping)
        tracker.retag(state, OPTIMIZER)
        for _ in range(STEPS - 1):
            micro = [work.batch(device) for _ in range(settings.grad_accum_steps)]
            for batch in micro:
                tracker.phase = "forward"
                with _autocast(device, settings.precision):
                    loss_sum, _ = loss_fn(model, batch)
                loss = loss_sum / work.targets()
                if through == "forward":
                    return
                tracker.phase = "backward"
                scaler.scale(loss).backward()
            tracker.retag([p.grad for p in params if p.grad is not None], GRADIENTS)
            if through != "optimizer":
                return
            tracker.phase = "optimizer"
            _traced_optimizer_step(optimizer, scaler, params, settings.max_grad_norm)
            tracker.retag(_optimizer_tensors(optimizer), OPTIMIZER)
            bookkeeping()
            optimizer.zero_grad(set_to_none=True)


def _method_bookkeeping(after_step: Callable[[nn.Module, int], None] | None, model: nn.Module,
                        tracker: LiveBytes) -> None:
    """The method's own work after an optimizer step, as `fit` runs it (AdaLoRA's importance scores: three
    copies of its weights, alive from the first step on, counted as extras). Run as step 0: the update
    without a re-allocation, whose threshold is read from values that fake tensors do not have."""
    if after_step is None:
        return
    since = tracker.tick
    after_step(model, 0)
    tracker.retag_born_since(since, EXTRAS)


def _steady_optimizer_state(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                            params: list[nn.Parameter], settings: Any, device: torch.device,
                            optimizer_step: bool, bookkeeping: Callable[[], None]) -> list[torch.Tensor]:
    """The optimizer state a first step leaves, made up front (tracing two full steps would cost twice the
    time): by a step on zero gradients, or, when the step is not traced, allocated at its exact analytic size
    (tested against the real optimizers); then the method's bookkeeping, on zero gradients."""
    for param in params:  # the step and the method's bookkeeping read gradients: zeros stand in
        param.grad = torch.zeros_like(param)
    if optimizer_step:
        _traced_optimizer_step(optimizer, scaler, params, settings.max_grad_norm)
        state = _optimizer_tensors(optimizer)
    else:
        momentum_free = settings.optimizer == "sgd" and not settings.momentum
        state = [torch.empty(0 if momentum_free else _param_state_bytes(p, settings.optimizer),
                             dtype=torch.uint8, device=device) for p in params]
    bookkeeping()
    optimizer.zero_grad(set_to_none=True)
    return state
