"""The training loop of one trial, written straight through: optimizer, schedule, precision, accumulation.

A lean loop rather than transformers.Trainer: batches are padded to their own longest row and grouped by
length, the loss is normalised over the whole accumulated batch, and nothing runs between steps that a
trial does not need (no callbacks, no per-step logging I/O).
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from autopeft import interrupt
from autopeft.data import TokenizedSplit, collate, length_grouped_batches, model_inputs
from autopeft.errors import TrialFailed

Optimizer = Literal["adamw", "adafactor", "sgd", "adamw_8bit"]
Precision = Literal["fp32", "bf16", "fp16"]
Scheduler = Literal["linear", "cosine", "constant"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adafactor", "sgd", "adamw_8bit")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    learning_rate: float
    optimizer: Optimizer = "adamw"
    precision: Precision = "fp32"
    grad_accum_steps: int = 1
    micro_batch_size: int = 16
    max_steps: int = 150
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: Scheduler = "linear"
    max_grad_norm: float = 1.0  # 0 disables clipping
    momentum: float = 0.9  # sgd only
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    init_loss_scale: float = 2.0**16  # fp16 only: GradScaler's starting scale
    seed: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    learning_rates: list[float] = field(default_factory=list)
    seconds: float = 0.0  # inside the loop: data to device, forward, backward, optimizer
    tokens: int = 0  # non-pad tokens seen
    positions: int = 0  # all positions computed, padding included
    examples: int = 0
    overflow_steps: int = 0  # fp16 steps skipped by the loss scaler
    final_loss_scale: float | None = None  # fp16 only

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def optimizer_problem(optimizer: str) -> str | None:
    """Why this optimizer cannot run here, or None. Checked before a trial trains."""
    if optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "adamw_8bit needs the bitsandbytes package (pip install bitsandbytes)"
    return None


def precision_problem(precision: str, device: torch.device) -> str | None:
    """Why this device cannot train at this precision, or None. Checked before a trial trains."""
    if precision == "fp32":
        return None
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return f"{precision} autocast is not available on {device.type}"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "bf16 is not supported by this GPU"
    return None


# Multiplicative scales that start at 1 ((IA)^3 vectors, DoRA magnitudes): decay pulls them towards switching
# their layer off, not towards the base model.
UNDECAYED_SCALES = ("ia3_l", "lora_magnitude_vector")


def decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters in two optimizer groups: weight decay on the rest, none on biases and norm
    weights (as HF Trainer leaves them) nor on the multiplicative scales above."""
    norms = {name for name, module in model.named_modules() if "norm" in type(module).__name__.lower()}
    decayed, exempt = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            owner, _, leaf = name.rpartition(".")
            # endswith: the prefix encoder's hidden_bias and out_bias are biases too
            spared = leaf.endswith("bias") or owner in norms or any(part in UNDECAYED_SCALES for part in name.split("."))
            (exempt if spared else decayed).append(param)
    groups = [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(params: list[nn.Parameter] | list[dict[str, Any]],
                    settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optimizer == "adafactor":
        # Factored second moments: O(rows + cols) state per matrix. transformers' Adafactor with a fixed,
        # absolute learning rate, so `learning_rate` means the same as for AdamW. (torch.optim.Adafactor
        # scales each step by the parameter's RMS, which leaves zero-initialised LoRA B matrices stuck.)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw_8bit":  # block-wise 8-bit moments (bitsandbytes): 2 bytes per weight
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(settings.warmup_ratio * settings.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, settings.max_steps - warmup)
        if settings.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if settings.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of per-example losses, number of examples). Summed so accumulation can normalise once."""
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(batch["labels"])


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over target positions, their number). `labels` has the input's shape with
    -100 on every position that is not a target (the prompt, padding), so only the answer is learned."""
    logits = model(**model_inputs(batch)).logits
    logits = logits[:, -batch["labels"].shape[1]:]  # drop positions of virtual tokens a method prepends
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def _endless_batches(data: TokenizedSplit, size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = data.lengths()
    while True:
        for rows in length_grouped_batches(lengths, size, generator):
            yield collate(data, rows, pad_id)


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


def fit(model: nn.Module, data: TokenizedSplit, settings: TrainSettings, *, pad_id: int,
        device: torch.device | None = None, loss_fn: LossFn = classification_loss,
        on_step: Callable[[int, nn.Module], None] | None = None,
        after_step: Callable[[nn.Module, int], None] | None = None) -> TrainResult:
    """Train `model` in place for `settings.max_steps` optimizer steps. `after_step(model, step)` runs after
    each optimizer step while gradients still exist, zeroed where the fp16 loss scaler skipped the step (a
    method's own bookkeeping, e.g. AdaLoRA's rank allocation; counted as training). `on_step(step, model)` runs after each step (e.g. an intermediate
    evaluation); its time is not counted as training time."""
    device = device or torch.device("cpu")
    problem = precision_problem(settings.precision, device)
    if problem:
        raise TrialFailed(f"unsupported precision: {problem}")
    problem = optimizer_problem(settings.optimizer)
    if problem:
        raise TrialFailed(f"unsupported optimizer: {problem}")
    if settings.gradient_checkpointing:
        _enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(decay_groups(model), settings)
    scheduler = build_scheduler(optimizer, settings)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    # Loss scaling only for fp16: its narrow exponent range underflows small gradients.
    scaler = torch.amp.GradScaler(device.type, init_scale=settings.init_loss_scale,
                                  enabled=settings.precision == "fp16")
    batches = _endless_batches(data, settings.micro_batch_size, pad_id, settings.seed)
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    for _ in range(settings.max_steps):
        interrupt.check()
        micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(settings.grad_accum_steps)]
        # Normalise by the targets of the whole accumulated batch, not per micro-batch, so k micro-batches
        # of size b give exactly the gradient of one batch of k*b even when their target counts differ.
        n_targets = sum(_count_targets(b) for b in micro)
        step_loss = 0.0
        for batch in micro:
            with autocast():
                loss_sum, _ = loss_fn(model, batch)
            loss = loss_sum / n_targets
            if not torch.isfinite(loss):
                raise TrialFailed("non-finite loss")
            scaler.scale(loss).backward()
            step_loss += loss.item()
            result.tokens += int(batch["attention_mask"].sum())
            result.positions += batch["attention_mask"].numel()
            result.examples += len(batch["input_ids"])
        skipped = _optimizer_step(optimizer, scaler, params, settings.max_grad_norm)
        result.overflow_steps += skipped
        result.losses.append(step_loss)
        result.learning_rates.append(scheduler.get_last_lr()[0])
        scheduler.step()
        if after_step is not None:
            if skipped:  # AdaLoRA scores rank importance from p.grad: an overflowed step's inf left its scores
                optimizer.zero_grad(set_to_none=False)  # NaN for good; zeros keep its schedule's steps too
            after_step(model, len(result.losses))
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            paused = time.perf_counter()
            on_step(len(result.losses), model)
            model.train()
            start += time.perf_counter() - paused
    result.seconds = time.perf_counter() - start
    if settings.max_steps and result.overflow_steps == settings.max_steps:  # the adapter is still its init
        raise TrialFailed(f"fp16 overflow: the loss scaler skipped all {settings.max_steps} optimizer steps "
                          "(gradients never finite), so nothing was trained; a lower learning rate or bf16 may train")
    require_finite_weights(model, len(result.losses))  # a later step's loss check cannot catch the last step's
    result.final_loss_scale = scaler.get_scale() if scaler.is_enabled() else None
    model.eval()
    return result


def _enable_checkpointing(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def require_finite_weights(model: nn.Module, step: int) -> None:
    """Fail the trial if an update sent a trained weight to inf or NaN. A finite loss can still give such an
    update (a huge learning rate, or clipping disabled); the next step's loss check would catch it, but not
    after the last step, nor before a mid-training evaluation: there NaN outputs failed the trial with
    scikit-learn's "Input contains NaN". Checked only where a model is about to be scored: a check every
    step costs a full fine-tune a pass over all its weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and not bool(torch.stack([torch.isfinite(p).all().to(params[0].device) for p in params]).all()):
        raise TrialFailed(f"non-finite weights after optimizer step {step}: the update overflowed "
                          "(a lower learning rate, or gradient clipping, may train)")


def _count_targets(batch: dict[str, torch.Tensor]) -> int:
    labels = batch["labels"]
    return int((labels != -100).sum()) if labels.dim() > 1 else len(labels)


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    params: list[nn.Parameter], max_grad_norm: float) -> int:
    """Clip (on unscaled gradients), step, update the loss scale. Returns 1 if fp16 overflow skipped the step."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
    scaler.step(optimizer)
    scaler.update()
    return int(scaler.is_enabled() and scaler.get_scale() < scale_before)
