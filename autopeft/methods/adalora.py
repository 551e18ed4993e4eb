"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning") through
peft: each targeted layer's update is P·diag(E)·Q (an SVD-like form); during training the least important
singular triplets are pruned, so a shrinking total rank budget flows to the layers that need it.

Schedule (peft's three phases, as fractions of the trial's optimizer steps so one search space fits any
`max_steps`): `warmup_fraction` of the steps train every layer at `init_r` (tinit); the budget then falls
on a cubic curve from init_r to `target_r` per layer on average, re-allocated every `update_every`
steps (deltaT); the last `final_fraction` of the steps (tfinal) train the final allocation. The training
loop calls `after_step` after each optimizer step, before gradients are cleared, because importance is
|weight x gradient|.

Design decisions:
- Impossible combinations are a failed trial with the reason, not a crash: peft needs a budget phase
  (tinit < total_step - tfinal), and pruning needs target_r < init_r (with target_r == init_r peft's
  allocator selects zero triplets and raises).
- tinit and tfinal are rounded to the nearest step (0.29 x 100 is 28.999... in floating point).
- peft adds AdaLoRA's orthogonality regulariser (keeping P and Q near-orthogonal so E behaves like
  singular values) only to a loss the model computes itself from `labels`; autopeft's loop computes the
  loss from the logits, so the regulariser is off and `orth_reg_weight` is recorded as 0 to say so.
- `target_modules` defaults to all_linear: allocating rank across the weight types is what AdaLoRA is
  for, and the paper adapts every weight matrix of the blocks.
- Saved with peft: after the final allocation only the kept triplets are stored (the rank pattern is in
  adapter_config.json) and peft re-sizes the layers on reload. peft then warns about zero-rank tensors
  "not gathered" (a layer pruned to rank 0) and about "rank_pattern keys" matching no module (LoRA's
  meaning of that field); both are spurious here: the reloaded logits match (tests/test_qlora_adalora.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from autopeft.errors import TrialFailed
from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import TARGET_SETS, family, target_modules

if TYPE_CHECKING:
    from peft import AdaLoraConfig


def schedule(params: dict[str, Any], total_step: int) -> tuple[int, int]:
    """(tinit, tfinal) in steps; raises TrialFailed when the combination leaves no budget phase."""
    init_r, target_r = int(params["init_r"]), int(params["target_r"])
    if target_r >= init_r:
        raise TrialFailed(f"adalora: target_r ({target_r}) must be below init_r ({init_r}): "
                          "the rank budget can only shrink")
    tinit = round(float(params["warmup_fraction"]) * total_step)
    tfinal = round(float(params["final_fraction"]) * total_step)
    if tinit >= total_step - tfinal:
        raise TrialFailed(f"adalora: warmup_fraction {params['warmup_fraction']} + final_fraction "
                          f"{params['final_fraction']} of {total_step} steps ({tinit} + {tfinal}) leave no "
                          "steps to reallocate the rank budget; their sum must stay below 1")
    if total_step - tfinal < 2:  # peft fixes the ranks at step total - tfinal from scores of the steps before it
        raise TrialFailed(f"adalora: final_fraction {params['final_fraction']} of {total_step} steps ({tfinal}) "
                          f"leaves {total_step - tfinal} step before the ranks are fixed; AdaLoRA needs at least 2 "
                          "(one to score the ranks): use more --max-steps or a smaller final_fraction")
    return tinit, tfinal


def space_problem(bounds: Callable[[str], tuple[float, float]]) -> str | None:
    """Refuse a space in which every draw breaks `schedule`'s rules."""
    if bounds("target_r")[0] >= bounds("init_r")[1]:
        return (f"target_r (at least {bounds('target_r')[0]:g}) must be below init_r (at most "
                f"{bounds('init_r')[1]:g}): the rank budget can only shrink")
    if bounds("warmup_fraction")[0] + bounds("final_fraction")[0] >= 1:
        return "warmup_fraction + final_fraction must stay below 1: no steps would be left to reallocate the rank budget"
    return None


def adalora_config(model: nn.Module, params: dict[str, Any], context: MethodContext) -> AdaLoraConfig:
    from peft import AdaLoraConfig

    tinit, tfinal = schedule(params, context.max_steps)
    return AdaLoraConfig(
        task_type=context.task_type,
        init_r=int(params["init_r"]),
        target_r=int(params["target_r"]),
        lora_alpha=float(params["alpha"]),
        lora_dropout=float(params["dropout"]),
        target_modules=target_modules(model, params["target_modules"]),
        fan_in_fan_out=family(model) == "gpt2",  # GPT-2's Conv1D stores weights in x out
        tinit=tinit,
        tfinal=tfinal,
        deltaT=int(params["update_every"]),
        total_step=context.max_steps,
        orth_reg_weight=0.0,  # not applied by autopeft's loss (module docstring): recorded as such
    )


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, adalora_config(model, params, context))


def after_step(model: nn.Module, step: int) -> None:
    """Update importance scores and prune to this step's budget (peft's RankAllocator)."""
    model.base_model.update_and_allocate(step)


register(Method(
    name="adalora",
    summary="SVD-form low-rank updates whose rank budget is pruned during training to the layers that "
            "matter most (peft).",
    params={
        "init_r": ParamSpec("int", 12, "rank of every update at the start", low=1, high=1024),
        "target_r": ParamSpec("int", 8, "average rank per update after pruning (below init_r)", low=1,
                              high=1024),
        "alpha": ParamSpec("float", 16.0, "scaling numerator: the update is multiplied by alpha/init_r",
                           low=1e-6),
        "dropout": ParamSpec("float", 0.0, "dropout on the adapter's input", low=0.0, high=0.9),
        "target_modules": ParamSpec("choice", "all_linear", "which linear layers get an adapter",
                                    choices=tuple(TARGET_SETS)),
        "warmup_fraction": ParamSpec("float", 0.1, "fraction of steps trained at init_r before pruning "
                                                   "(tinit)", low=0.0, high=1.0),
        "final_fraction": ParamSpec("float", 0.2, "fraction of steps at the end trained with the final "
                                                  "allocation (tfinal)", low=0.0, high=1.0),
        "update_every": ParamSpec("int", 10, "steps between two budget re-allocations (deltaT)", low=1),
    },
    apply=apply, peft_backed=True, can_merge=True, after_step=after_step, space_problem=space_problem,
))
