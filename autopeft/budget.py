"""Which memory estimate decides a trial against the budget: the instant one where the answer is clear,
the exact one where it is not.

The analytic estimate is off by -52% to +35% against measured peaks (experiments/memory/results.md), so
on its own it may only reject a configuration far above the budget: one it puts above 1.5x the budget
measures above 1.1x. Every configuration that could fit is traced (one fake-tensor step: about a second on
MiniLM), so no trial is admitted on the analytic figure. Three things keep rejections cheap (the issue's
bar: under a second each):
- a configuration that could be over the budget first gets quick estimates: its first two and three blocks
  traced and grown to full depth (`memory.estimate_extrapolated`), the forward pass alone (a third of the
  operations; without gradient checkpointing about the whole peak), then forward and backward (compared
  with the full trace in experiments/memory/extrapolation.md); above the budget on either, it is rejected
  without the full trace;
- a traced estimate is remembered per memory-relevant configuration: the learning rate, schedule and seed
  do not change memory, so a configuration that differs only in those is not traced again;
- each trace calibrates the analytic estimate of its family (the same method, memory settings and method
  choices, differing in sizes such as the rank: `search.estimate_memory`): the analytic error is mostly a
  property of the family, so a later configuration whose calibrated figure is clearly above the budget (1.2x)
  is rejected without tracing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence

from autopeft.memory import MemoryEstimate

ANALYTIC_REJECT = 1.5  # uncalibrated analytic figure above this x budget: over budget whatever its error
CALIBRATED_REJECT = 1.2  # calibrated figure above this x budget: over budget
EXTRAPOLATED_REJECT = 1.03  # quick bound above this x budget: over budget (it reads up to 2% high)
ANALYTIC_UNDER = 2.1  # the analytic figure is at worst 52% under the peak: below budget / 2.1 it surely fits


def recorded_over(estimate: dict, budget: int) -> bool:
    """Whether a trial's recorded estimate (MemoryEstimate.as_dict()) puts it over `budget` by the rule the gate
    rejects on: an analytic figure only far above it (a search without a budget records one), a calibrated or
    extrapolated one above its margin, a traced one above the budget itself."""
    level = estimate.get("level", "analytic")
    margin = {"analytic": ANALYTIC_REJECT, "calibrated": CALIBRATED_REJECT, "traced": 1.0}.get(level, EXTRAPOLATED_REJECT)
    return estimate.get("total", 0) > margin * budget


@dataclasses.dataclass
class BudgetGate:
    """Chooses and remembers the estimate that decides each configuration; one per search process."""

    traced: dict[Hashable, MemoryEstimate] = dataclasses.field(default_factory=dict)
    ratios: dict[Hashable, float] = dataclasses.field(default_factory=dict)  # family -> traced / analytic
    traces: int = 0  # how many configurations were traced (the slow path)

    def decide(self, analytic: MemoryEstimate, budget: int, key: Hashable, family: Hashable,
               trace: Callable[[], MemoryEstimate],
               quick: Sequence[Callable[[], MemoryEstimate | None]] = ()) -> MemoryEstimate:
        """The estimate to compare with `budget`: remembered, analytic, calibrated, one of the `quick`
        lower estimates (tried in order; each only rejects) or traced."""
        if key in self.traced:
            return self.traced[key]
        if analytic.total > ANALYTIC_REJECT * budget:
            return analytic
        calibrated = self.calibrated(analytic, family)
        if calibrated is not None and calibrated.total > CALIBRATED_REJECT * budget:
            return calibrated
        if analytic.total * ANALYTIC_UNDER > budget:  # could be over: try the quick traces, cheapest first
            for attempt in quick:
                found = attempt()
                if found is not None and found.total > EXTRAPOLATED_REJECT * budget:
                    return self._remember(key, family, analytic, found)
        self.traces += 1
        return self._remember(key, family, analytic, trace())

    def _remember(self, key: Hashable, family: Hashable, analytic: MemoryEstimate,
                  estimate: MemoryEstimate) -> MemoryEstimate:
        self.traced[key] = estimate
        if analytic.total > 0:  # the lowest ratio seen: calibration errs towards tracing, not rejecting
            ratio = estimate.total / analytic.total
            self.ratios[family] = min(ratio, self.ratios.get(family, ratio))
        return estimate

    def calibrated(self, analytic: MemoryEstimate, family: Hashable) -> MemoryEstimate | None:
        ratio = self.ratios.get(family)
        if ratio is None:
            return None
        # The correction goes to activations, the part the analytic model approximates most coarsely.
        extra = round(analytic.total * ratio) - analytic.total
        return dataclasses.replace(
            analytic, activations=max(0, analytic.activations + extra), level="calibrated",
            notes=(*analytic.notes, (f"analytic x {ratio:.2f}, the ratio traced/analytic measured on a traced "
                                    "configuration of the same method, training settings and method choices")))
