"""The traced level: the real training step on fake tensors (`estimate_traced`), and the quick estimate
grown from two and three blocks that a budget rejects with (`estimate_extrapolated`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.errors import ModelError, first_line
from autopeft.memory.cuda_allocator import CachingAllocator, cuda_workspace_bytes
from autopeft.memory.live_bytes import EXTRAS, GRADIENTS, OPTIMIZER, TRAINABLE, WEIGHTS, LiveBytes
from autopeft.memory.result import MemoryEstimate
from autopeft.memory.stand_ins import _method_stand_ins
from autopeft.memory.traced_step import _run_traced_steps, _Workload, steady_settings


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Module.to() swaps fake parameters in place (peft moves every new adapter to its base layer's device),
    # and swapping refuses a tensor that has weak references: the converter's memo keeps one on every fake
    # tensor it makes. The memo only serves converting real tensors, which a model built fake never needs.
    mode.fake_tensor_converter.set_tensor_memo = lambda *_: None
    # Tensor.__deepcopy__ copies a fake tensor's attributes, its mode included, and two modes refuse to mix
    # (peft deep-copies the classification head). There is one mode: a copy of it is itself.
    mode.__deepcopy__ = lambda memo: mode
    return mode


@contextlib.contextmanager
def _tensor_mode(trace_device: torch.device) -> Iterator[None]:
    """Where a trace's tensors live: the meta device (shapes only; the quick estimates' first choice), or
    fake tensors on the CPU or the GPU."""
    if trace_device.type == "meta":
        with trace_device:
            yield
        return
    with _fake_mode(), trace_device if trace_device.type == "cuda" else contextlib.nullcontext():
        yield


def _model_config(model: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    from autopeft.models import resolve_model_path

    if isinstance(model, nn.Module):
        if hasattr(model, "autopeft_adapter") or hasattr(model, "peft_config"):
            raise ValueError("estimate_traced needs the base model, before any adapter is attached")
        return model.config
    if isinstance(model, PretrainedConfig):
        return model
    try:
        return AutoConfig.from_pretrained(resolve_model_path(str(model)))
    except (OSError, ValueError) as exc:  # not on the hub, offline, not a model folder
        raise ModelError(f"--model: cannot load {model!r}: {first_line(exc)}") from exc


def _build_base(model: Any, config: Any, task_type: str, num_labels: int, dtype: torch.dtype) -> nn.Module:
    """The base model, built from its config (under the fake mode: no memory, no checkpoint read)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    if isinstance(model, nn.Module):
        return type(model)._from_config(config, dtype=dtype)
    if config.pad_token_id is None:  # as load_classifier does for decoders: pad with EOS
        eos = config.eos_token_id
        config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    if task_type == "SEQ_CLS":
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def estimate_traced(model: Any, method: str, method_params: dict[str, Any], settings: Any, *, seq_len: int,
                    device: str | torch.device = "cpu", task_type: str = "SEQ_CLS", num_labels: int = 2,
                    max_steps: int | None = None, dtype: torch.dtype = torch.float32,
                    trace_device: str | torch.device | None = None) -> MemoryEstimate:
    """Peak bytes of a training step of `method` on `model`, traced on fake tensors (no real memory).

    `model`: the base model (an unadapted nn.Module, e.g. the search's pristine copy: only its class and
    config are used), its config (transformers PretrainedConfig), or what `--model` accepts (hub id,
    folder, packaged:<name>; only the config is read). `settings`: an `autopeft.train.TrainSettings`
    (optimizer, precision, micro_batch_size, grad_accum_steps, gradient_checkpointing, max_grad_norm are
    used). `seq_len`: tokens per row (the longest batch). `device`: where training will run ("cuda" works
    on a CPU-only machine: the CPU trace is corrected for the GPU allocator, see the package docstring, autopeft/memory/__init__.py).
    `dtype`: the weights' storage dtype (autopeft trains fp32 weights under autocast). `trace_device`:
    where the fake tensors live; by default the target itself when this machine has it, else the CPU
    (forcing "cpu" for a CUDA target checks the planning mode on a machine with a GPU)."""
    start = time.perf_counter()
    tracker, target, notes = _trace(model, method, method_params, settings, seq_len=seq_len, device=device,
                                    task_type=task_type, num_labels=num_labels, max_steps=max_steps, dtype=dtype,
                                    trace_device=trace_device)
    return _from_tracker(tracker, target, notes, time.perf_counter() - start)


def _trace(model: Any, method: str, method_params: dict[str, Any], settings: Any, *, seq_len: int,
           device: str | torch.device, task_type: str, num_labels: int, max_steps: int | None,
           dtype: torch.dtype, trace_device: str | torch.device | None, layers: int | None = None,
           through: str = "optimizer") -> tuple[LiveBytes, torch.device, list[str]]:
    """One traced step (see `estimate_traced`), on the first `layers` blocks if given: the tracker."""
    from autopeft import adapter_io, methods
    from autopeft.methods import MethodContext
    from autopeft.models import pads_left

    target = torch.device(device)
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {target.type!r}")
    if seq_len < 2 or settings.micro_batch_size < 1:
        raise ValueError("seq_len must be at least 2 and micro_batch_size at least 1")
    if trace_device is None:
        trace_device = target if target.type == "cpu" or torch.cuda.is_available() else torch.device("cpu")
    trace_device = torch.device(trace_device)
    planning = trace_device.type == "cpu" and target.type == "cuda"
    notes: list[str] = []
    if planning:
        notes.append("planned for CUDA from a CPU trace: attention without dropout (the GPU's fused kernel "
                     "keeps no probabilities), multi-tensor optimizer path, cuBLAS workspaces added")
    config = _model_config(model) if layers is None else _with_layers(_model_config(model), layers)
    work = _Workload(steady_settings(settings), seq_len, task_type, num_labels, int(config.vocab_size))
    tracker = LiveBytes(block=512 if target.type == "cuda" else 1)
    with warnings.catch_warnings(), _tensor_mode(trace_device):
        warnings.simplefilter("ignore")  # fake tensors make torch and peft warn about data pointers
        base = _build_base(model, config, task_type, num_labels, dtype)
        work = dataclasses.replace(work, left_padded=pads_left(base, task_type))
        for param in base.parameters():  # as the search does: the method freezes what it does not train
            param.requires_grad_(True)
        with _method_stand_ins(method, notes):
            net = adapter_io.attach(base, method, dict(method_params),
                                    MethodContext(task_type, max_steps or settings.max_steps))
        with _fused_attention_dropout(planning=planning):
            _run_traced_steps(net, work, trace_device, tracker, notes, foreach=target.type == "cuda",
                              through=through, after_step=methods.get(method).after_step)
    return tracker, target, notes


def estimate_extrapolated(model: Any, method: str, method_params: dict[str, Any], settings: Any, *,
                          seq_len: int, device: str | torch.device = "cpu", task_type: str = "SEQ_CLS",
                          num_labels: int = 2, max_steps: int | None = None,
                          dtype: torch.dtype = torch.float32, through: str = "backward",
                          meta: bool = True) -> MemoryEstimate | None:
    """A quick estimate for rejecting (within 2% of the traced one on the estimator benchmark, lower where
    the full step peaks inside the optimizer step): forward and backward of the first two and
    three blocks, grown to the model's L identical blocks. `through="forward"` traces the forward pass only,
    at about a third of the operations: its peak is a lower bound of the step's.

    Within each phase (forward, backward), the bytes alive at that phase's peak grow by the same amount per
    block (each block adds its weights, gradients, optimizer state and the activations it keeps for
    backward), so each part is `two + (L - 2) * (three - two)`; the estimate is the phase whose grown peak is
    highest (with few blocks the peak may sit in another phase than with many). Not from one block: where a
    method keeps a tensor of its own in each block (prompt tuning, (IA)^3, LoRA dropout), the peak with one
    block holds one hidden state less than the steady growth, and growing from it read up to 8% high. The
    optimizer state is allocated at its exact size but the optimizer step is not traced: where the full trace
    peaks inside that step, this is lower. Returns None where the full trace must decide: fewer than 6 blocks
    (nothing to save), or a CUDA target (its caching-allocator replay is not additive). experiments/memory/
    extrapolation.md compares it with the full trace on the estimator benchmark's configurations.
    `meta`: trace on the meta device where the step allows it (see `_quick_trace`), else on fake tensors.
    Other arguments as `estimate_traced`."""
    if through not in ("forward", "backward"):
        raise ValueError(f"through must be forward or backward, not {through!r}")
    blocks = getattr(_model_config(model), "num_hidden_layers", None)
    if not isinstance(blocks, int) or blocks < 6 or torch.device(device).type != "cpu":
        return None
    start = time.perf_counter()
    (two, where), (three, _) = (_quick_trace(model, method, method_params, settings, seq_len=seq_len,
                                             task_type=task_type, num_labels=num_labels, max_steps=max_steps,
                                             dtype=dtype, layers=k, through=through, meta=meta) for k in (2, 3))
    grown = []
    for phase in two.phase_peaks.keys() & three.phase_peaks.keys():
        a, b = two.at_tick(two.phase_peaks[phase]), three.at_tick(three.phase_peaks[phase])
        parts = {tag: max(0, a.get(tag, 0) + (blocks - 2) * (b.get(tag, 0) - a.get(tag, 0)))
                 for tag in a.keys() | b.keys()}
        grown.append((sum(parts.values()), phase, parts))
    _, phase, parts = max(grown, key=lambda found: found[0])
    traced = "forward and backward" if through == "backward" else "the forward pass"
    return MemoryEstimate(
        weights=parts.get(WEIGHTS, 0), trainable=parts.get(TRAINABLE, 0), gradients=parts.get(GRADIENTS, 0),
        optimizer_state=parts.get(OPTIMIZER, 0), extras=parts.get(EXTRAS, 0), activations=parts.get(None, 0),
        level="extrapolated" if through == "backward" else "extrapolated-forward", device="cpu",
        peak_at=phase, seconds=time.perf_counter() - start,
        notes=((f"{traced} traced on 2 and 3 of {blocks} blocks ({where}), each phase's peak grown linearly; "
               "the optimizer step is not traced"),))


# (model class, method, checkpointing) whose step read a tensor's values on the meta device: traced fake
_META_REFUSED: set[tuple[str, str, bool]] = set()


def _quick_trace(model: Any, method: str, method_params: dict[str, Any], settings: Any, *, layers: int,
                 meta: bool, **options: Any) -> tuple[LiveBytes, str]:
    """A CPU trace of the first `layers` blocks for `estimate_extrapolated`: on the meta device where the
    step runs there as on the CPU, else on fake tensors. The meta device keeps no per-tensor bookkeeping:
    the same trace in 0.55-0.7x the time, lower only by the attention mask it goes without
    (`_Workload.batch`; experiments/memory/extrapolation.md: -0.02% to -0.19%, the forward pass alone with
    checkpointing -1.3%). Fake tensors where the meta device would differ: 16-bit precision (autocast has no
    meta device: activations would stay fp32), attention without dropout (the CPU runs its fused kernel,
    the meta device has none and keeps the S x S probabilities), qlora, and steps that read values (a
    decoder's checkpointed mask), remembered per model class and method."""
    config = _model_config(model)
    key = (type(config).__name__, method, bool(settings.gradient_checkpointing))
    alike = settings.precision == "fp32" and method != "qlora" and _attention_keeps_probabilities(config)
    if meta and alike and key not in _META_REFUSED:
        try:
            return _trace(model, method, method_params, settings, device="cpu", trace_device="meta",
                          layers=layers, **options)[0], "meta device"
        except Exception:  # noqa: BLE001 -- any refusal of the meta device: the fake trace decides
            _META_REFUSED.add(key)
    return _trace(model, method, method_params, settings, device="cpu", trace_device=None, layers=layers,
                  **options)[0], "fake tensors"


def _attention_keeps_probabilities(config: Any) -> bool:
    """Whether attention on the CPU runs the unfused path that keeps the S x S probabilities, as on the meta
    device: eager attention, or dropout on attention (the CPU's fused kernel has none)."""
    if getattr(config, "_attn_implementation", None) == "eager":
        return True
    names = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "attn_dropout")
    return any(isinstance(getattr(config, name, None), (int, float)) and getattr(config, name) > 0 for name in names)


def warm_up(model: Any, method: str = "lora", *, seq_len: int = 8, micro_batch_size: int = 1,
            task_type: str = "SEQ_CLS", num_labels: int = 2, meta: bool = False) -> float:
    """Trace forward and backward of `method` (its default parameters) on the model's first block and
    discard it; returns its seconds. The first trace of a process pays for loading the tracer's machinery,
    and each operation on new shapes for a cache entry: a search pays them up front
    (autopeft.search.warm_up_tracer), not in its first rejections. `meta`: the quick estimates' trace
    (on the meta device where it applies), whose first use of each operation also costs."""
    from autopeft import methods
    from autopeft.train import TrainSettings

    start = time.perf_counter()
    settings = TrainSettings(learning_rate=1e-4, micro_batch_size=micro_batch_size)
    options = {"seq_len": seq_len, "task_type": task_type, "num_labels": num_labels, "max_steps": 2, "dtype": torch.float32,
                   "layers": 1, "through": "backward"}
    if meta:
        _quick_trace(model, method, methods.get(method).resolve({}), settings, meta=True, **options)
    else:
        _trace(model, method, methods.get(method).resolve({}), settings, device="cpu", trace_device=None,
               **options)
    return time.perf_counter() - start


def _with_layers(config: Any, layers: int) -> Any:
    """A copy of a model config with only its first `layers` blocks."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-block attention kinds (sliding, full)
        config.layer_types = config.layer_types[:layers]
    return config


@contextlib.contextmanager
def _fused_attention_dropout(*, planning: bool) -> Iterator[None]:
    """CUDA's fused attention kernels apply attention dropout inside the kernel (a random seed, no mask);
    the CPU's fused kernel has no dropout, so with dropout the CPU falls back to attention that keeps the
    S x S probabilities and the dropout mask. Planning for CUDA on the CPU, attention runs without dropout,
    which has the memory of the GPU's fused kernel."""
    if not planning:
        yield
        return
    real = F.scaled_dot_product_attention

    def fused(*args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) > 4:  # dropout_p given by position
            args = (*args[:4], 0.0, *args[5:])
        return real(*args, **{**kwargs, **({"dropout_p": 0.0} if "dropout_p" in kwargs else {})})

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _from_tracker(tracker: LiveBytes, target: torch.device, notes: list[str], seconds: float) -> MemoryEstimate:
    if target.type == "cuda":  # the peak of what the caching allocator hands out, not of the tensors
        allocator = CachingAllocator()
        tick, peak = allocator.replay(tracker.events())
        parts = tracker.at_tick(tick, block=CachingAllocator.MIN_BLOCK)
        slack = peak - sum(parts.values())
    else:
        parts, slack = tracker.at_peak(), 0
    return MemoryEstimate(
        weights=parts.get(WEIGHTS, 0), trainable=parts.get(TRAINABLE, 0), gradients=parts.get(GRADIENTS, 0),
        optimizer_state=parts.get(OPTIMIZER, 0), extras=parts.get(EXTRAS, 0), activations=parts.get(None, 0),
        workspace=cuda_workspace_bytes(target) if target.type == "cuda" else 0, allocator=slack,
        level="traced", device=str(target), peak_at=tracker.peak_phase, seconds=seconds, notes=tuple(notes))
