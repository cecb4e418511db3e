"""Time the phases of training steps for ``trainer.profile=true``.

The loop wraps each step's forward pass, backward pass and ``optimizer.step()`` in
``StepProfiler.phase``. An optimizer with a ``profiler`` attribute receives
``StepProfiler.section`` there and wraps its own work in named sections: ``"precondition"``
(statistics, inverses, solves) and ``"per_sample"`` (patch extraction, per-sample gradients,
Gram matrices). Sections run inside the phase that calls them (FNGD, KFAC and Eva capture
statistics in the backward pass), so each section's time is taken out of that phase. The
epoch's breakdown is then

    forward       the forward phase without sections
    backward      the backward phase without sections
    precondition  all "precondition" sections, wherever they ran
    per_sample    all "per_sample" sections, wherever they ran
    update        optimizer.step() without sections

plus ``profile_other_s``: the rest of the epoch's training time (data loading, zero_grad,
loss bookkeeping and the gaps between phases).

On CUDA every boundary is a CUDA event recorded on the device's current stream, and the
events are read once at the end of the epoch, so profiling does not synchronise the device
at every phase. The durations are then device time between the boundaries. On the CPU the
boundaries are ``time.perf_counter()`` readings.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

logger = logging.getLogger(__name__)

# The phases the training loop times; "step" is reported as "update".
PHASES = ("forward", "backward", "step")
PHASE_KEYS = {"forward": "forward", "backward": "backward", "step": "update"}

# Sections an optimizer may time; other names are accepted and reported under their own key.
KNOWN_SECTIONS = ("precondition", "per_sample")

# Prefix of every key that profiling adds to an epoch's record.
KEY_PREFIX = "profile_"

_SECTION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class _Interval:
    name: str
    is_phase: bool
    parent: Optional[int]          # index of the enclosing interval, None at top level
    start: object                  # float seconds, or a torch.cuda.Event
    end: object = None


class StepProfiler:
    """Timer for the phases of training steps and the optimizer's sections within them.

    Args:
        device: the training device. CUDA devices are timed with CUDA events, every other
            device with ``time.perf_counter()``.

    Intervals nest: a section opened inside a phase is its child, and each interval's
    exclusive time is its duration minus that of its children. Phases and sections must be
    opened and closed in order, one at a time, as a training step does. ``epoch_summary()``
    returns the totals of the intervals recorded since the last call.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.uses_events = self.device.type == "cuda"
        self._intervals: list[_Interval] = []
        self._open: list[int] = []
        self._steps = 0
        # CUDA events are reused from one epoch to the next.
        self._event_pool: list = []
        self._events_used = 0

    def attach(self, optimizer: object) -> bool:
        """Give ``optimizer`` this profiler's ``section``, if it has a ``profiler`` attribute.

        Returns whether it has one. Optimizers without the attribute (``torch.optim``) are
        timed as a whole in the update phase.
        """
        if not hasattr(optimizer, "profiler"):
            return False
        optimizer.profiler = self.section
        return True

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Time one of the loop's phases: ``"forward"``, ``"backward"`` or ``"step"``."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; valid phases: {', '.join(PHASES)}")
        if name == "forward":
            self._steps += 1
        return self._interval(name, is_phase=True)

    def section(self, name: str) -> contextlib.AbstractContextManager:
        """Time a named part of the optimizer's work, such as ``"precondition"``."""
        if not isinstance(name, str) or not _SECTION_NAME.match(name) or name in PHASE_KEYS \
                or name in PHASE_KEYS.values() or name == "other":
            raise ValueError(f"invalid profiler section name {name!r}: use lower-case letters, "
                             "digits and underscores, and none of forward, backward, step, "
                             f"update, other (the usual ones are {', '.join(KNOWN_SECTIONS)})")
        return self._interval(name, is_phase=False)

    @contextlib.contextmanager
    def _interval(self, name: str, is_phase: bool) -> Iterator[None]:
        index = len(self._intervals)
        parent = self._open[-1] if self._open else None
        self._intervals.append(_Interval(name, is_phase, parent, self._timestamp()))
        self._open.append(index)
        try:
            yield
        finally:
            self._open.pop()
            self._intervals[index].end = self._timestamp()

    def _timestamp(self) -> object:
        if not self.uses_events:
            return time.perf_counter()
        # NOTE: this CUDA-event path has not yet run on a GPU; the tests cover the CPU path.
        if self._events_used == len(self._event_pool):
            self._event_pool.append(torch.cuda.Event(enable_timing=True))
        event = self._event_pool[self._events_used]
        self._events_used += 1
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _seconds(self, interval: _Interval) -> float:
        if self.uses_events:
            return interval.start.elapsed_time(interval.end) / 1000.0
        return interval.end - interval.start

    def epoch_summary(self, train_time_s: Optional[float] = None) -> dict[str, float | int]:
        """Return the epoch's totals in seconds and start a new epoch.

        Keys: ``profile_steps`` and ``profile_<part>_s`` for forward, backward, precondition,
        per_sample and update (always present, 0.0 when nothing ran), any other section
        name, and ``profile_other_s`` when ``train_time_s`` (the epoch's training time) is
        given.
        """
        if self._open:
            names = ", ".join(self._intervals[index].name for index in self._open)
            raise RuntimeError(f"epoch_summary() was called while these intervals are still "
                               f"open: {names}")
        if self.uses_events and self._intervals:
            # The only wait for the device that profiling adds: once an epoch.
            torch.cuda.synchronize(self.device)

        durations = [self._seconds(interval) for interval in self._intervals]
        exclusive = list(durations)
        for index, interval in enumerate(self._intervals):
            if interval.parent is not None:
                exclusive[interval.parent] -= durations[index]

        parts = {key: 0.0 for key in ("forward", "backward", *KNOWN_SECTIONS, "update")}
        top_level = 0.0
        for index, interval in enumerate(self._intervals):
            part = PHASE_KEYS[interval.name] if interval.is_phase else interval.name
            parts[part] = parts.get(part, 0.0) + exclusive[index]
            if interval.parent is None:
                top_level += durations[index]

        summary: dict[str, float | int] = {f"{KEY_PREFIX}steps": self._steps}
        for part, seconds in parts.items():
            summary[f"{KEY_PREFIX}{part}_s"] = seconds
        if train_time_s is not None:
            # Device time between boundaries can exceed the wall time by rounding only.
            summary[f"{KEY_PREFIX}other_s"] = max(train_time_s - top_level, 0.0)

        self._intervals.clear()
        self._events_used = 0
        self._steps = 0
        return summary


def profile_parts(record: dict) -> dict[str, float]:
    """Return the per-part seconds of a record written with profiling, keyed by part name."""
    parts = {}
    for key, value in record.items():
        if key.startswith(KEY_PREFIX) and key.endswith("_s") and isinstance(value, (int, float)):
            parts[key[len(KEY_PREFIX):-len("_s")]] = float(value)
    return parts
