"""What an estimate holds: the peak bytes of one training step, by part."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
