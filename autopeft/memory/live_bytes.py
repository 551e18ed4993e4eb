"""The tracker both the traced estimate and the CPU measurement use: the bytes of tensor storages alive
during a step (real or fake tensors), and what was alive at the peak, by part."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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

    def retag_born_since(self, tick: int, tag: str) -> None:
        """Mark the untagged storages born after `tick` and still alive as `tag` (a method's own state)."""
        for record in self._live.values():
            if record.born > tick and record.tag is None:
                record.tag = tag

    @property
    def tick(self) -> int:
        """The count of storages seen so far: a point to `retag_born_since`."""
        return self._tick

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
