"""Attach, save, reload and merge an adapter, whichever method made it.

peft-backed methods use peft's own format (`adapter_config.json` + `adapter_model.safetensors`), so plain
peft loads them without autopeft. Our own methods (MoRA, bottleneck adapters, encoder prefix tuning)
write `autopeft_adapter.json` (method, its parameters, task type, base model) and the trainable tensors
in `adapter_model.safetensors`; reloading applies the method to a fresh base and loads those tensors, so
reload is exact by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from autopeft import methods
from autopeft.methods import MethodContext

OWN_CONFIG = "autopeft_adapter.json"
PEFT_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
HEAD_NAMES = ("classifier", "score")  # the new classification head trains with every method
_TAG = "autopeft_adapter"  # attribute on an adapted model: which method and parameters built it


def attach(model: nn.Module, method: str, params: dict[str, Any], context: MethodContext) -> nn.Module:
    """Apply `method` to `model` (whose parameters may all require grad; the method freezes the base)."""
    adapted = methods.get(method).apply(model, params, context)
    setattr(adapted, _TAG, {"method": method, "params": dict(params), "task_type": context.task_type,
                            "max_steps": context.max_steps})
    return adapted


def freeze_base(model: nn.Module, task_type: str) -> None:
    """For our own methods: freeze everything, then unfreeze a classification head (call before injecting)."""
    for name, param in model.named_parameters():
        head = task_type == "SEQ_CLS" and name.split(".")[0] in HEAD_NAMES
        param.requires_grad_(head)


def config_file(folder: Path) -> Path:
    """The adapter's config file in `folder`: peft's or ours."""
    own = folder / OWN_CONFIG
    return own if own.is_file() else folder / PEFT_CONFIG


def is_saved_adapter(folder: Path) -> bool:
    return (folder / OWN_CONFIG).is_file() or (folder / PEFT_CONFIG).is_file()


def remove_saved(folder: Path) -> None:
    """Delete an adapter saved in `folder` (its config files and weights); other files stay. Left beside a new
    adapter, our config file would be read first and the folder would load as the other method."""
    for path in [folder / OWN_CONFIG, folder / PEFT_CONFIG, *folder.glob("adapter_model.*")]:
        path.unlink(missing_ok=True)


def save(model: nn.Module, folder: Path) -> None:
    info = getattr(model, _TAG)
    remove_saved(folder)  # an earlier adapter written there (`train --force`) must not outlive this one
    if methods.get(info["method"]).peft_backed:
        model.save_pretrained(folder)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    base = getattr(getattr(model, "config", None), "name_or_path", "")
    (folder / OWN_CONFIG).write_text(json.dumps({**info, "base_model_name_or_path": base}, indent=2))
    save_file(trainable, str(folder / WEIGHTS))


def load(base: nn.Module, folder: Path | str) -> nn.Module:
    """`base` (a fresh, unadapted model; it is modified) with the adapter saved in `folder` (a path or its str, as
    an export's README writes it)."""
    folder = Path(folder)
    if (folder / OWN_CONFIG).is_file():
        from safetensors.torch import load_file

        info = json.loads((folder / OWN_CONFIG).read_text())
        model = attach(base, info["method"], info["params"], MethodContext(info["task_type"], info["max_steps"]))
        tensors = load_file(str(folder / WEIGHTS))
        own = dict(model.named_parameters())
        missing = [name for name, p in own.items() if p.requires_grad and name not in tensors]
        if missing or set(tensors) - set(own):
            raise ValueError(f"{folder / WEIGHTS} does not match {info['method']}: missing {missing[:3]}, "
                             f"unexpected {sorted(set(tensors) - set(own))[:3]}")
        for name, tensor in tensors.items():
            own[name].data.copy_(tensor)
        return model
    from peft import PeftModel

    from autopeft.methods import prompt

    model = PeftModel.from_pretrained(base, str(folder))
    prompt.on_load(model)
    config = model.peft_config[model.active_adapter]
    name = "dora" if getattr(config, "use_dora", False) else _PEFT_METHODS.get(str(config.peft_type.value))
    if name:  # merge (and save again) read which method built it; peft's own config holds its parameters
        setattr(model, _TAG, {"method": name, "params": None, "task_type": str(config.task_type), "max_steps": None})
    return model


_PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "ADALORA": "adalora", "PROMPT_TUNING": "prompt"}


def merge(model: nn.Module) -> nn.Module:
    """The model with the trained update folded into its base weights (only for methods that can merge)."""
    info = getattr(model, _TAG)
    method = methods.get(info["method"])
    if not method.can_merge:
        raise ValueError(f"{method.name} cannot be merged into the base weights")
    return method.merge(model) if method.merge else model.merge_and_unload()
