"""Peak training memory of one configuration: predicted before it trains, and measured.

Three functions, one quantity: the bytes of tensor storage alive at the worst moment of a training step
in steady state (weights, trainable parameters, gradients, optimizer state, activations, temporaries).

- `estimate(...)`: analytic, instant. Weights and optimizer state are exact sums over the parameters;
  activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models"): per layer, 16-bit, s·b·h·(34 + 5·a·s/h) bytes, doubled for fp32; with gradient checkpointing
  only each layer's input is kept, plus one layer's activations while it is recomputed. With a frozen base,
  backward still needs every layer's activations to carry the gradient down to the lowest adapter, so the
  formula applies to PEFT as to full fine-tuning. Added: a causal LM's vocabulary logits, and under
  16-bit autocast the 16-bit weight copies backward keeps. It knows nothing of attention kernels or of
  each method's own activations, so it is a first guess.
- `estimate_traced(...)`: runs the real training step (the loop of `autopeft.train.fit`: its optimizer,
  autocast, loss scaling, gradient clipping, checkpointing) on a model built under torch's
  `FakeTensorMode`: tensors carry shapes, dtypes and storages but no data, so a 7B model costs no memory
  and seconds of CPU. `LiveBytes` counts the storages alive after every operation and keeps the peak,
  with what was alive at that moment sorted into weights, trainable parameters, gradients, optimizer
  state, the adapter's own activations ("extras") and the remaining activations.
- `measure(...)`: the same steps for real (`fit` itself, two optimizer steps, on synthetic full-length
  batches): on CUDA `torch.cuda.max_memory_allocated`, on the CPU the peak of the same `LiveBytes`
  tracker, so estimate and measurement count the same thing.

Design decisions:
- Steady state: the first step allocates the optimizer state only at its end; every later step carries
  it through forward and backward. The measurement runs two steps and reports the peak over both; the
  trace makes the state up front (an optimizer step on zero gradients) and then traces one step, which
  costs half the time. With gradient accumulation, two micro-batches (the second runs with gradients
  already held) stand for any number.
- The batch: full length, `micro_batch_size` x `seq_len` (the longest batch sets the peak). The measured
  one has one padded position, as real batches of varying lengths do: a model skips building its
  attention mask for a batch without padding, which the trace, seeing no values, cannot know.
- Storages, not tensors: a view shares its base's storage and is counted once (keyed by the storage's
  identity); a storage is subtracted when it is freed (a weak reference on it; torch keeps a storage's
  Python object alive exactly as long as the storage itself).
- Estimating for CUDA: on a machine with CUDA the fake tensors live on the GPU, so kernels, autocast
  lists and the optimizer's multi-tensor path are the GPU's; without one (planning for a GPU on a CPU
  machine) the step is traced on the CPU and corrected for what differs: the caching allocator rounds
  every block up to 512 bytes, the optimizer takes its multi-tensor (foreach) path, and cuBLAS holds a
  workspace per thread that runs matmuls (forward and autograd's backward thread) -- counted under
  "workspace". Attention on the CPU already uses a fused (flash) kernel as on the GPU, so the S x S score
  matrix is not materialised on either.
- What cannot run on fake tensors is replaced by a stand-in with the same memory: bitsandbytes' 8-bit
  AdamW (its state is allocated from the exact analytic layout of `optimizer_state_bytes`); qlora's
  4-bit layers are quantized by bitsandbytes itself (its ops have fake kernels) and run by qlora's own
  class, but built around a plain parameter, since bitsandbytes' Params4bit refuses fake tensors. Each
  substitution is named in the estimate's `notes`.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autopeft.config import format_bytes

PARTS = ("weights", "trainable", "gradients", "optimizer_state", "activations", "extras", "workspace", "allocator")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of a training step, by part; `total` is their sum (the parts partition the peak)."""

    weights: int  # frozen parameters and buffers, at their storage precision
    gradients: int
    optimizer_state: int
    activations: int  # everything else alive at the peak: saved activations, temporaries, the batch
    trainable: int = 0  # the trainable parameters themselves
    extras: int = 0  # activations created inside the adapter's own modules (LoRA A/B, prompt encoder...)
    workspace: int = 0  # device library workspaces (cuBLAS), CUDA only
    allocator: int = 0  # CUDA only: cached blocks handed out whole, larger than the tensors they hold
    level: str = "analytic"  # analytic | traced | extrapolated[-forward] (traced on fewer blocks) | calibrated
    device: str = "cpu"
    peak_at: str = ""  # traced: the phase of the step where the peak happened (forward, backward, optimizer)
    seconds: float = 0.0  # how long the estimate took
    notes: tuple[str, ...] = ()  # substitutions and assumptions the estimate made

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in PARTS)

    def parts(self) -> dict[str, int]:
        return {part: getattr(self, part) for part in PARTS}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "notes": list(self.notes), "total": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts().items() if v or k in PARTS[:4])
        return f"{format_bytes(self.total)} ({parts})"

    def table(self) -> str:
        """A plain-text breakdown table (what `autopeft estimate` prints)."""
        rows = [(part.replace("_", " "), value) for part, value in self.parts().items()]
        rows.append(("total", self.total))
        lines = [f"{name:<16} {format_bytes(value):>12} {value / max(self.total, 1):>7.1%}"
                 for name, value in rows]
        where = f", peak in {self.peak_at}" if self.peak_at else ""
        header = f"peak training memory ({self.level}, {self.device}{where})"
        return "\n".join([header, *lines, *(f"note: {note}" for note in self.notes)])


# --------------------------------------------------------------------------------------------------------
# Analytic level
# --------------------------------------------------------------------------------------------------------

# Bytes of optimizer state per trainable weight, in units of the parameter's element size.
_MOMENTS = {"adamw": 2, "sgd": 1}


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """Exactly what the optimizer of `autopeft.train.build_optimizer` holds after its first step.

    AdamW (torch): two moments like the parameter plus a 4-byte step counter per tensor. SGD with momentum:
    one buffer. Adafactor (transformers, no first moment): row and column second moments for a matrix
    (a full one for a vector) plus a 0-d RMS per tensor. 8-bit AdamW (bitsandbytes): see `_adamw_8bit_state`.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    eight_bit = optimizer == "adamw_8bit" and any(p.numel() >= 4096 for p in trainable)
    shared = _ADAMW_8BIT_CODE_MAPS if eight_bit else 0
    return shared + sum(_param_state_bytes(p, optimizer) for p in trainable)


def _param_state_bytes(param: torch.Tensor, optimizer: str) -> int:
    size = param.element_size()
    if optimizer == "adafactor":
        if param.dim() >= 2:
            rows = math.prod(param.shape[:-1])
            cols = math.prod(param.shape[:-2]) * param.shape[-1]
            return size * (rows + cols) + size
        return size * param.numel() + size
    if optimizer == "adamw_8bit":
        return _adamw_8bit_state(param.numel())
    if optimizer not in _MOMENTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: adamw, adafactor, sgd, adamw_8bit")
    step_counter = 4 if optimizer == "adamw" else 0
    return _MOMENTS[optimizer] * size * param.numel() + step_counter


_ADAMW_8BIT_CODE_MAPS = 2 * 256 * 4  # two 256-entry fp32 code maps, one pair shared by all 8-bit tensors


def _adamw_8bit_state(numel: int, min_8bit_size: int = 4096, block: int = 256) -> int:
    """bitsandbytes keeps fp32 moments for tensors under 4096 elements (most LoRA matrices!); larger ones
    get two uint8 moments and an fp32 absmax per 256-element block each (plus the shared code maps)."""
    if numel < min_8bit_size:
        return 8 * numel
    return 2 * numel + 2 * 4 * -(-numel // block)


def activation_bytes(model: nn.Module, *, micro_batch_size: int, seq_len: int, precision: str,
                     gradient_checkpointing: bool = False) -> int:
    config = model.config if hasattr(model, "config") else None
    layers = getattr(config, "num_hidden_layers", 1)
    hidden = getattr(config, "hidden_size", 1)
    heads = getattr(config, "num_attention_heads", 1)
    per_layer_16bit = seq_len * micro_batch_size * hidden * (34 + 5 * heads * seq_len / hidden)
    scale = 2.0 if precision == "fp32" else 1.0
    if gradient_checkpointing:  # each layer's input kept (2 bytes/value in 16 bit), one layer recomputed
        return int((layers * seq_len * micro_batch_size * hidden * 2 + per_layer_16bit) * scale)
    return int(layers * per_layer_16bit * scale)


def logits_bytes(model: nn.Module, *, micro_batch_size: int, seq_len: int, precision: str,
                 task_type: str) -> int:
    """A causal LM's logits over the vocabulary: in the compute dtype, their fp32 copy for the loss, its
    log-softmax and the gradient flowing back (a classification head's few logits are negligible)."""
    if task_type != "CAUSAL_LM":
        return 0
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    compute = 4 if precision == "fp32" else 2
    return micro_batch_size * seq_len * vocab * (compute + 3 * 4)


def autocast_copy_bytes(model: nn.Module, *, precision: str, gradient_checkpointing: bool) -> int:
    """Under 16-bit autocast every matmul casts its fp32 weight to 16 bits, and backward keeps that copy to
    carry the gradient through the layer: half the block weights again, for the whole step. With
    checkpointing a layer's copies live only while it is recomputed (counted in its activations)."""
    if precision == "fp32" or gradient_checkpointing:
        return 0
    matmul_weights = (p for name, p in model.named_parameters()
                      if p.dim() == 2 and p.dtype == torch.float32 and "embed" not in name and "wte" not in name
                      and "wpe" not in name)
    return sum(2 * p.numel() for p in matmul_weights)


def estimate(model: nn.Module, *, optimizer: str, precision: str, micro_batch_size: int, seq_len: int,
             gradient_checkpointing: bool = False, task_type: str = "SEQ_CLS") -> MemoryEstimate:
    """Analytic peak bytes of one training step of `model` (adapter already attached) at this configuration."""
    start = time.perf_counter()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(
        weights=frozen + sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable=trainable,
        gradients=trainable,
        optimizer_state=optimizer_state_bytes(model, optimizer),
        activations=activation_bytes(model, micro_batch_size=micro_batch_size, seq_len=seq_len,
                                     precision=precision, gradient_checkpointing=gradient_checkpointing)
        + logits_bytes(model, micro_batch_size=micro_batch_size, seq_len=seq_len, precision=precision,
                       task_type=task_type)
        + autocast_copy_bytes(model, precision=precision, gradient_checkpointing=gradient_checkpointing),
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------------------
# The live-bytes tracker
# --------------------------------------------------------------------------------------------------------

# Tags of the storages the tracker counts (None: activations and temporaries).
WEIGHTS, TRAINABLE, GRADIENTS = "weights", "trainable", "gradients"
OPTIMIZER, EXTRAS = "optimizer_state", "extras"


@dataclass(eq=False)
class _Storage:
    nbytes: int
    born: int
    tag: str | None
    died: int | None = None
    ref: Any = None  # the weak reference whose callback subtracts this storage when it is freed


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive while it is active, and the peak.

    Every operation's outputs are looked at: a storage seen for the first time is added (views of it are
    not: the key is the storage itself), a weak reference subtracts it when it is freed. Tensors that
    exist before (a model's parameters) are added with `add_model` / `add`. `block` rounds every storage
    up to a multiple (512 mimics the CUDA caching allocator). `history` keeps every storage's lifetime,
    which `at_peak` needs (off, the tracker holds only what is alive: for long runs). Works on real and
    fake tensors alike."""

    def __init__(self, *, block: int = 1, history: bool = True) -> None:
        super().__init__()
        self.block = block
        self.history = history
        self.current = 0
        self.peak = 0
        self.phase = "step"  # set by the caller: recorded with the peak
        self.peak_phase = ""
        self.phase_peaks: dict[str, int] = {}  # phase -> the tick of its own peak (estimate_extrapolated)
        self._phase_peak_bytes: dict[str, int] = {}
        self.tag: str | None = None  # given to storages born now (EXTRAS inside an adapter's module)
        self._tick = 0
        self._peak_tick = 0
        self._live: dict[int, _Storage] = {}
        self._history: list[_Storage] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.prim.device.default and hasattr(args[0], "fake_device"):
            # Over half the calls a fake step makes are device queries (the autograd engine's, F.linear's):
            # answered here, they skip a pass through the fake mode and allocate nothing.
            return args[0].fake_device
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._see(leaf, self.tag)
        if self.current > self.peak:
            self.peak, self._peak_tick, self.peak_phase = self.current, self._tick, self.phase
        if self.current > self._phase_peak_bytes.get(self.phase, -1):
            self._phase_peak_bytes[self.phase], self.phase_peaks[self.phase] = self.current, self._tick
        return out

    def add(self, tensor: torch.Tensor, tag: str | None = None) -> None:
        """Count an existing tensor as alive from now on (a no-op for one already counted)."""
        self._see(tensor, tag)
        self.peak = max(self.peak, self.current)

    def add_model(self, model: nn.Module) -> None:
        """A model's parameters (trainable or frozen), buffers and quantization statistics: alive from now."""
        for param in model.parameters():
            self.add(param, TRAINABLE if param.requires_grad else WEIGHTS)
            for tensor in _quant_state_tensors(param):
                self.add(tensor, WEIGHTS)
        for buffer in model.buffers():
            self.add(buffer, WEIGHTS)

    def retag(self, tensors: list[torch.Tensor], tag: str) -> None:
        """Mark the storages of these (live) tensors as `tag`, from their birth (gradients, optimizer state)."""
        for tensor in tensors:
            record = self._live.get(_storage_key(tensor))
            if record is not None and record.tag not in (WEIGHTS, TRAINABLE):
                record.tag = tag

    def at_peak(self) -> dict[str | None, int]:
        """Bytes alive at the peak, by tag (None: untagged, i.e. activations and temporaries)."""
        return self.at_tick(self._peak_tick)

    def at_tick(self, tick: int, block: int = 1) -> dict[str | None, int]:
        """Bytes alive at a moment of the history, by tag, each storage rounded up to `block`."""
        if not self.history:
            raise ValueError("the breakdown needs a tracker made with history=True")
        totals: dict[str | None, int] = {}
        for record in self._history:
            if record.born <= tick and (record.died is None or record.died > tick):
                totals[record.tag] = totals.get(record.tag, 0) + -(-record.nbytes // block) * block
        return totals

    def events(self) -> list[tuple[int, bool, _Storage]]:
        """(tick, born?, storage) for every allocation and free of the history, in order."""
        found = [(r.born, True, r) for r in self._history]
        found += [(r.died, False, r) for r in self._history if r.died is not None]
        return sorted(found, key=lambda event: event[0])

    def _see(self, tensor: torch.Tensor, tag: str | None) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage of their own
            return
        key, nbytes = storage._cdata, self._round(storage.nbytes())
        record = self._live.get(key)
        if record is not None:
            if record.nbytes != nbytes:  # resized in place (an out= op)
                self.current += nbytes - record.nbytes
                record.nbytes = nbytes
            return
        self._tick += 1
        record = _Storage(nbytes, self._tick, tag)
        record.ref = weakref.ref(storage, self._on_free(key, record))
        self._live[key] = record
        if self.history:
            self._history.append(record)
        self.current += nbytes

    def _on_free(self, key: int, record: _Storage) -> Callable[[Any], None]:
        def freed(_: Any) -> None:
            if self._live.get(key) is record:
                del self._live[key]
                self.current -= record.nbytes
                self._tick += 1
                record.died = self._tick

        return freed

    def _round(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's block statistics on the parameter, not as buffers."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return []
    states = [state, getattr(state, "state2", None)]  # double quantization nests a second state
    return [v for s in states if s is not None for v in vars(s).values() if isinstance(v, torch.Tensor)]


@contextlib.contextmanager
def _tag_adapter_activations(model: nn.Module, tracker: LiveBytes) -> Iterator[None]:
    """While a module of the adapter itself runs forward, what it creates is tagged EXTRAS."""
    depth = [0]

    def enter(*_: Any) -> None:
        depth[0] += 1
        tracker.tag = EXTRAS

    def leave(*_: Any) -> None:
        depth[0] -= 1
        tracker.tag = EXTRAS if depth[0] else None

    handles = []
    for module in _adapter_modules(model):
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adapter_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that own trainable parameters only, outside the classification head: the adapter's."""
    from autopeft.adapter_io import HEAD_NAMES

    found = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and all(p.requires_grad for p in own) and not set(name.split(".")) & set(HEAD_NAMES):
            found.append(module)
    return found


# --------------------------------------------------------------------------------------------------------
# The training step, as autopeft.train.fit runs it
# --------------------------------------------------------------------------------------------------------

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


class _AdamW8bitStandIn(torch.optim.Optimizer):
    """Holds bitsandbytes' 8-bit AdamW state, in the layout of `_adamw_8bit_state`, and updates nothing
    (bitsandbytes' kernels cannot run on fake tensors; its update is in place and allocates nothing)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})
        self.code_maps: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and not self.state[param]:
                    self.state[param] = self._state(param)

    def _state(self, param: torch.Tensor, min_8bit_size: int = 4096,
               block: int = 256) -> dict[str, torch.Tensor]:
        numel, device = param.numel(), param.device
        if numel < min_8bit_size:
            return {f"state{i}": torch.zeros(numel, dtype=torch.float32, device=device) for i in (1, 2)}
        if not self.code_maps:
            self.code_maps = {f"qmap{i}": torch.zeros(256, dtype=torch.float32, device=device) for i in (1, 2)}
        blocks = -(-numel // block)
        state = {f"state{i}": torch.zeros(numel, dtype=torch.uint8, device=device) for i in (1, 2)}
        state |= {f"absmax{i}": torch.zeros(blocks, dtype=torch.float32, device=device) for i in (1, 2)}
        return state | self.code_maps


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

    def batch(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """A full-length batch (no padding: the longest batch sets the peak). On the meta device without an
        attention mask: models read the mask's values to decide how to use it (the fake mode answers such
        reads, the meta device cannot); the trace then reads a little low, which a rejecting bound allows."""
        rows, width = self.settings.micro_batch_size, self.seq_len
        ids = torch.randint(1, max(2, min(self.vocab_size, 1000)), (rows, width), device=device)
        mask = None if device.type == "meta" else torch.ones(rows, width, dtype=torch.long, device=device)
        labels = (torch.randint(0, self.num_labels, (rows,), device=device) if self.task_type == "SEQ_CLS"
                  else ids.clone())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def targets(self) -> int:
        per_row = 1 if self.task_type == "SEQ_CLS" else self.seq_len - 1
        return per_row * self.settings.micro_batch_size * self.settings.grad_accum_steps


def _run_traced_steps(model: nn.Module, work: _Workload, device: torch.device, tracker: LiveBytes,
                      notes: list[str], *, foreach: bool, through: str = "optimizer") -> None:
    """`autopeft.train.fit`'s loop on `model` (fake tensors) in steady state, under `tracker`. `foreach`:
    the optimizer takes its multi-tensor path, as torch chooses for real CUDA tensors. `through`: the last
    phase traced. Short of "optimizer", the optimizer state is allocated at its exact size and the step is
    not run (its own temporaries are left out: a lower bound, at a fraction of the operations); "forward"
    stops before the backward pass."""
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
        state = _steady_optimizer_state(optimizer, scaler, params, settings, device, through == "optimizer")
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
            optimizer.zero_grad(set_to_none=True)


def _steady_optimizer_state(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                            params: list[nn.Parameter], settings: Any, device: torch.device,
                            optimizer_step: bool) -> list[torch.Tensor]:
    """The optimizer state a first step leaves, made up front (tracing two full steps would cost twice the
    time): by a step on zero gradients, or, when the step is not traced, allocated at its exact analytic
    size (tested against the real optimizers)."""
    if not optimizer_step:
        momentum_free = settings.optimizer == "sgd" and not settings.momentum
        return [torch.empty(0 if momentum_free else _param_state_bytes(p, settings.optimizer),
                            dtype=torch.uint8, device=device) for p in params]
    for param in params:
        param.grad = torch.zeros_like(param)
    _traced_optimizer_step(optimizer, scaler, params, settings.max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return _optimizer_tensors(optimizer)


# --------------------------------------------------------------------------------------------------------
# Traced level: the step on fake tensors
# --------------------------------------------------------------------------------------------------------


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
    return AutoConfig.from_pretrained(resolve_model_path(str(model)))


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
    on a CPU-only machine: the CPU trace is corrected for the GPU allocator, see the module docstring).
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
    from autopeft import adapter_io
    from autopeft.methods import MethodContext

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
        for param in base.parameters():  # as the search does: the method freezes what it does not train
            param.requires_grad_(True)
        with _method_stand_ins(method, notes):
            net = adapter_io.attach(base, method, dict(method_params),
                                    MethodContext(task_type, max_steps or settings.max_steps))
        with _fused_attention_dropout(planning=planning):
            _run_traced_steps(net, work, trace_device, tracker, notes, foreach=target.type == "cuda",
                              through=through)
    return tracker, target, notes


def estimate_extrapolated(model: Any, method: str, method_params: dict[str, Any], settings: Any, *,
                          seq_len: int, device: str | torch.device = "cpu", task_type: str = "SEQ_CLS",
                          num_labels: int = 2, max_steps: int | None = None,
                          dtype: torch.dtype = torch.float32, through: str = "backward",
                          meta: bool = True) -> MemoryEstimate | None:
    """A quick estimate for rejecting (within 2% of the traced one on the estimator benchmark, lower where
    the full step peaks inside the optimizer step): forward and backward of the first one and
    two blocks, grown to the model's L identical blocks. `through="forward"` traces the forward pass only,
    at about a third of the operations: its peak is a lower bound of the step's.

    Within each phase (forward, backward), the bytes alive at that phase's peak grow by the same amount per
    block (each block adds its weights, gradients, optimizer state and the activations it keeps for
    backward), so each part is `one + (L - 1) * (two - one)`; the estimate is the phase whose grown peak is
    highest (with few blocks the peak may sit in another phase than with many). The optimizer state is
    allocated at its exact size but the optimizer step is not traced: where the full trace peaks inside
    that step, this is lower. Returns None where the full trace must decide: fewer than 4 blocks (nothing
    to save), or a CUDA target (its caching-allocator replay is not additive). experiments/memory/
    extrapolation.md compares it with the full trace on the estimator benchmark's configurations.
    `meta`: trace on the meta device where the step allows it (see `_quick_trace`), else on fake tensors.
    Other arguments as `estimate_traced`."""
    if through not in ("forward", "backward"):
        raise ValueError(f"through must be forward or backward, not {through!r}")
    blocks = getattr(_model_config(model), "num_hidden_layers", None)
    if not isinstance(blocks, int) or blocks < 4 or torch.device(device).type != "cpu":
        return None
    start = time.perf_counter()
    (one, where), (two, _) = (_quick_trace(model, method, method_params, settings, seq_len=seq_len,
                                           task_type=task_type, num_labels=num_labels, max_steps=max_steps,
                                           dtype=dtype, layers=k, through=through, meta=meta) for k in (1, 2))
    grown = []
    for phase in one.phase_peaks.keys() & two.phase_peaks.keys():
        a, b = one.at_tick(one.phase_peaks[phase]), two.at_tick(two.phase_peaks[phase])
        parts = {tag: max(0, a.get(tag, 0) + (blocks - 1) * (b.get(tag, 0) - a.get(tag, 0)))
                 for tag in a.keys() | b.keys()}
        grown.append((sum(parts.values()), phase, parts))
    _, phase, parts = max(grown, key=lambda found: found[0])
    traced = "forward and backward" if through == "backward" else "the forward pass"
    return MemoryEstimate(
        weights=parts.get(WEIGHTS, 0), trainable=parts.get(TRAINABLE, 0), gradients=parts.get(GRADIENTS, 0),
        optimizer_state=parts.get(OPTIMIZER, 0), extras=parts.get(EXTRAS, 0), activations=parts.get(None, 0),
        level="extrapolated" if through == "backward" else "extrapolated-forward", device="cpu",
        peak_at=phase, seconds=time.perf_counter() - start,
        notes=((f"{traced} traced on 1 and 2 of {blocks} blocks ({where}), each phase's peak grown linearly; "
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


class CachingAllocator:
    """The bytes PyTorch's CUDA caching allocator (default settings) reports as allocated, replayed from a
    sequence of allocations and frees: torch.cuda.max_memory_allocated counts whole blocks, and a block is
    often larger than its tensor. Requests are rounded up to 512 bytes; up to 1 MiB they come from 2 MiB
    segments, up to 10 MiB from 20 MiB segments, beyond in their own segment rounded up to 2 MiB; the
    smallest cached free block that fits is used, and split only if what remains is at least 512 bytes
    (small pool) or more than 1 MiB (large pool): otherwise the whole block is handed out. Freed blocks
    merge with free neighbours of their segment. (CUDACachingAllocator.cpp: round_size,
    get_allocation_size, get_free_block, should_split, free_block.)"""

    MIN_BLOCK, SMALL, SMALL_SEGMENT, LARGE_SEGMENT, MIN_LARGE_ALLOC, ROUND_LARGE = (
        512, 1 << 20, 2 << 20, 20 << 20, 10 << 20, 2 << 20)

    def __init__(self) -> None:
        self.free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # small? -> (size, seg, at)
        self.size: dict[tuple[int, int], int] = {}  # every block: (segment, offset) -> size
        self.ending: dict[tuple[int, int], int] = {}  # (segment, end) -> offset of the block ending there
        self.in_small_pool: list[bool] = []  # per segment
        self.is_free: set[tuple[int, int]] = set()
        self.allocated = 0

    def replay(self, events: list[tuple[int, bool, Any]]) -> tuple[int, int]:
        """(tick of the peak, peak allocated bytes) over (tick, allocated?, storage with .nbytes) events."""
        handles: dict[int, tuple[int, int]] = {}
        peak, peak_tick = 0, 0
        for tick, born, record in events:
            if born:
                handle = self.malloc(record.nbytes)
                if handle is not None:
                    handles[id(record)] = handle
                if self.allocated > peak:
                    peak, peak_tick = self.allocated, tick
            elif id(record) in handles:
                self.release(handles.pop(id(record)))
        return peak_tick, peak

    def malloc(self, nbytes: int) -> tuple[int, int] | None:
        if nbytes == 0:
            return None
        size = max(self.MIN_BLOCK, -(-nbytes // self.MIN_BLOCK) * self.MIN_BLOCK)
        small = size <= self.SMALL
        pool = self.free[small]
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index < len(pool):
            block, segment, offset = pool[index]
            self._take_free((segment, offset))
        else:
            segment, offset, block = len(self.in_small_pool), 0, self._segment_size(size, small)
            self.in_small_pool.append(small)
        remaining = block - size
        if remaining >= self.MIN_BLOCK if small else remaining > self.SMALL:
            self._place(segment, offset + size, remaining, free=True)
            block = size
        self._place(segment, offset, block, free=False)
        self.allocated += block
        return segment, offset

    def release(self, handle: tuple[int, int]) -> None:
        segment, offset = handle
        size = self.size.pop(handle)
        del self.ending[(segment, offset + size)]
        self.allocated -= size
        after = (segment, offset + size)
        if after in self.is_free:  # merge with the free block that follows
            size += self._take_free(after)
        before = self.ending.get((segment, offset))
        if before is not None and (segment, before) in self.is_free:  # and with the one before
            size += self._take_free((segment, before))
            offset = before
        self._place(segment, offset, size, free=True)

    def _segment_size(self, size: int, small: bool) -> int:
        if small:
            return self.SMALL_SEGMENT
        if size < self.MIN_LARGE_ALLOC:
            return self.LARGE_SEGMENT
        return -(-size // self.ROUND_LARGE) * self.ROUND_LARGE

    def _place(self, segment: int, offset: int, size: int, *, free: bool) -> None:
        self.size[(segment, offset)] = size
        self.ending[(segment, offset + size)] = offset
        if free:
            self.is_free.add((segment, offset))
            bisect.insort(self.free[self.in_small_pool[segment]], (size, segment, offset))

    def _take_free(self, key: tuple[int, int]) -> int:
        """Remove a free block (to hand it out, or to merge it into a neighbour); returns its size."""
        segment, offset = key
        size = self.size.pop(key)
        self.ending.pop((segment, offset + size), None)
        self.is_free.discard(key)
        pool = self.free[self.in_small_pool[segment]]
        pool.pop(bisect.bisect_left(pool, (size, segment, offset)))
        return size


def cuda_workspace_bytes(device: torch.device | None = None) -> int:
    """cuBLAS workspaces that torch allocates through the caching allocator: one per thread that runs
    matmuls (ours for forward, autograd's device thread for backward), of torch's default size: 32 MiB on
    Hopper and newer (compute capability >= 9), 8 MiB + 128 KiB before; CUBLAS_WORKSPACE_CONFIG overrides.
    A GPU of unknown kind (planning on a CPU machine) is taken to be Hopper-class."""
    import os
    import re

    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
    sizes = re.findall(r":([0-9]+):([0-9]+)", config)
    if sizes:
        per_thread = sum(int(size) * 1024 * int(count) for size, count in sizes)
    else:
        major = torch.cuda.get_device_capability(device)[0] if torch.cuda.is_available() else 9
        per_thread = 4096 * 1024 * 8 if major >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8
    return 2 * per_thread


@contextlib.contextmanager
def _method_stand_ins(method: str, notes: list[str]) -> Iterator[None]:
    """qlora's 4-bit layers cannot be built on fake tensors (bitsandbytes' Params4bit refuses a fake tensor
    as its data): while the method attaches, its `quantize_layer` is replaced by `_fake_quantize_layer`."""
    if method != "qlora":
        yield
        return
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from autopeft.methods import qlora

    # The first quantization builds bitsandbytes' code map from values (impossible on fake tensors) and
    # caches it: build it here, for real (1 KiB).
    with unset_fake_temporarily():
        bnb.functional.quantize_blockwise(torch.zeros(256))
    real = qlora.quantize_layer
    qlora.quantize_layer = _fake_quantize_layer
    notes.append("qlora: the 4-bit layers are built around bitsandbytes' Params4bit (which refuses fake "
                 "tensors) but quantized by bitsandbytes and run by qlora's own layer class")
    try:
        yield
    finally:
        qlora.quantize_layer = real


def _fake_quantize_layer(layer: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """`autopeft.methods.qlora.quantize_layer` on fake tensors: bitsandbytes quantizes the weight (its ops
    have fake kernels), the result becomes qlora's own Linear4bit class, built without the constructor
    (which makes a Params4bit); the packed weight is a plain parameter carrying Params4bit's attributes,
    all that bitsandbytes, qlora and peft read of it."""
    import bitsandbytes as bnb

    from autopeft.methods import qlora

    weight, from_conv1d = qlora._dense_weight(layer)
    out_features, in_features = weight.shape
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
    cls = qlora.nf4_linear_class()
    quantized = cls.__new__(cls)
    nn.Module.__init__(quantized)
    quantized.in_features, quantized.out_features = in_features, out_features
    quantized.compute_dtype, quantized.compute_type_is_set = compute_dtype, True
    quantized.quant_state, quantized.quant_storage = None, torch.uint8
    quantized.support_avx512bf16_for_cpu = False
    param = nn.Parameter(packed, requires_grad=False)
    for name, value in {"quant_state": state, "blocksize": 64, "compress_statistics": double_quant,
                        "quant_type": "nf4", "quant_storage": torch.uint8, "bnb_quantized": True,
                        "module": quantized}.items():
        setattr(param, name, value)
    quantized.weight = param
    quantized.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(compute_dtype),
                                                                  requires_grad=False)
    setattr(quantized, qlora._FROM_CONV1D, from_conv1d)
    return quantized


# --------------------------------------------------------------------------------------------------------
# Measurement: the real step
# --------------------------------------------------------------------------------------------------------


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
            task_type: str = "SEQ_CLS", num_labels: int = 2, pad_id: int | None = None) -> int:
    """The real peak bytes of training `model` (adapter attached) for two steps of `fit` on full-length
    synthetic batches: on CUDA torch.cuda.max_memory_allocated above what was allocated before the model
    moved there; on the CPU the peak of `LiveBytes`. Trains `model` in place (its weights change)."""
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
                           num_labels=num_labels, pad_left=task_type == "SEQ_CLS" and _family(model) != "bert")
    loss_fn = classification_loss if task_type == "SEQ_CLS" else causal_lm_loss

    def run() -> None:
        fit(model, data, steady, pad_id=pad, device=target, loss_fn=loss_fn)

    if target.type == "cuda":
        return _cuda_peak(model, target, run)
    tracker = LiveBytes(history=False)
    tracker.add_model(model)
    with tracker:
        run()
    return tracker.peak


def _family(model: nn.Module) -> str:
    from autopeft.models import family

    return family(model)


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
