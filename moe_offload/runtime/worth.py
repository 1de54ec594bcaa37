"""What a copy into the device cache is worth: each expert's expected use, and the link time prefetches have.

A copy pays for itself when the expert it brings is used before it leaves and
lands before it is needed. Two rules follow, shared by prefetch and promotion
(and so by the engine and the simulator, through the call protocol):

- never evict a likelier expert: a copy may only evict residents whose
  expected use per call is below the newcomer's. Per expert the expected
  use is an exponential average of whether its layer's calls selected it
  (``ExpectedUse``). A prefetch with chance ``p`` (the predictor's) of use by
  the coming call is worth its average after that call plus ``p`` spread
  over the calls a resident keeps its slot (``prefetch_worth``): an
  imminent use alone does not justify evicting an expert that is used
  every other call. The saving of a resident expert per
  use (CPU or copy time minus device time) is the same for every expert of a
  model at one token count, so comparing chances compares benefits.
- spend only the link time there is (``LinkBudget``): a prefetch for layer
  l+d must land before that layer would be delayed by it, i.e. within the
  time layers l..l+d-1 take (this call as planned; the others as the
  scheduler would plan their predicted experts, the copies queued for them
  counted as landed) plus the time the layer's CPU-run experts outlast its
  device experts, counting the copies already on the link and the demand
  copies of layer l, which go first.
- fill this call's link time, no more: a copy for l+d (d >= 2) is queued
  now only when it starts before this call ends. Queued at the next call it
  would start no later (the link serves prefetches in order), while queued
  now behind a busy link it would take the place of the copies the next calls
  queue for nearer layers, and evict a resident earlier than it must.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..cache import ExpertLayout, ExpertSlots

USE_ALPHA = 0.1     # weight of the newest call in an expert's expected use
HORIZON = 1.0 / USE_ALPHA   # calls a resident is expected to keep its slot (the average's memory)


class ExpectedUse:
    """Per expert key, the exponentially averaged share of its layer's calls that selected it."""

    def __init__(self, layout: ExpertLayout):
        self.layout = layout
        self.use = np.zeros(layout.num_keys)                     # [L*E]

    def observe(self, layer: int, selected: list[int]) -> None:
        experts = self.layout.experts_per_layer
        row = self.use[layer * experts : (layer + 1) * experts]  # [E] view
        row *= 1.0 - USE_ALPHA
        row[selected] += USE_ALPHA

    def once_more(self, key: int) -> float:
        """``key``'s expected use once the call that just selected it is observed."""
        return self.use[key] * (1.0 - USE_ALPHA) + USE_ALPHA

    def protected(self, slots: ExpertSlots, chance: float) -> set[int]:
        """Residents at least as likely to be used as ``chance``: a copy with that chance never evicts them."""
        residents = slots.slot_to_expert[slots.slot_to_expert >= 0]
        return set(residents[self.use[residents] >= chance].tolist())

    def prefetch_worth(self, key: int, chance: float) -> float:
        """What a prefetch of ``key`` (chance ``chance`` of use by its coming call) is worth per call of its
        layer, against a victim's expected use: its use then (expected, after that call) plus the coming
        call's use spread over the ``HORIZON`` calls a resident is expected to keep its slot."""
        return self.use[key] * (1.0 - USE_ALPHA) + USE_ALPHA * chance + chance / HORIZON


class LinkBudget:
    """Link time a router call's prefetches may spend, in seconds from now.

    ``durations``: the projected durations of layers l, l+1, ... known so far (at least this call's);
    ``predict(d)``, when given, projects layer l+d's duration the first time a deadline needs it, so a
    projection sees the copies already queued for nearer layers. ``depth``: how many layers ahead have
    a deadline (default: one per duration given). ``slack(d, expert)``, when given: how late into layer
    l+d a copy of ``expert`` may land without delaying it."""

    def __init__(self, start_s: float, copy_s: float, durations: Sequence[float], depth: int | None = None,
                 predict: Callable[[int], float] | None = None, slack: Callable[[int, int], float] | None = None):
        self.start_s = start_s          # when a copy queued now starts (copies on the link and this call's demand)
        self.copy_s = copy_s            # one expert's copy
        self.depth = len(durations) if depth is None else depth
        self._durations = list(durations)
        self._predict = predict
        self._slack = slack

    def deadline(self, distance: int) -> float:
        """By when a copy for layer l+``distance`` must have landed: when that layer starts."""
        while len(self._durations) < distance:
            self._durations.append(self._predict(len(self._durations)))
        return sum(self._durations[:distance])

    def closed(self, distance: int, queued: int) -> bool:
        """Whether no copy for distance ``distance`` or beyond fits after ``queued`` already queued now (a farther
        layer, or more copies queued, never fits where this one does not)."""
        return distance > self.depth or (distance > 1 and self.start_s + queued * self.copy_s >= self._durations[0])

    def fits(self, distance: int, queued: int, expert: int = -1) -> bool:
        """Whether one more copy for distance ``distance``, after ``queued`` already queued now, lands in time
        and, beyond the next layer, starts before this call ends."""
        if self.closed(distance, queued):
            return False
        begin = self.start_s + queued * self.copy_s
        lands, deadline = begin + self.copy_s, self.deadline(distance)
        if lands <= deadline:
            return True
        return self._slack is not None and expert >= 0 and lands <= deadline + self._slack(distance, expert)
