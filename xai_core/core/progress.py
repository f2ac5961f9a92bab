"""The one progress protocol of xai-core: ``progress(done, total, what)``.

Every long job (explaining files, ``compare()``, ``audit()``, occlusion's perturbations, the
randomisation metric's cascade) reports through a callable of this type:

* ``done``: units of real work finished so far (inputs, images, perturbed inputs, stages...);
  a float between two units while a sub-task of the next one reports its own counts
  (:func:`within`), so that a bar moves and an ETA exists even for one long input;
* ``total``: units in all, or ``None`` while unknown;
* ``what``: a short plain-text description of the work, e.g. ``"occlusion of img1.png"``.

It is called after each unit of work (or chunk of units), never required, and must be cheap: the
command line draws a bar on a terminal and prints periodic lines otherwise (:class:`LineProgress`,
with the throughput and the time left of :class:`Throughput`: the one place they are computed
and formatted). Explainers and metrics
that accept a keyword-only ``progress`` option get one passed down by ``compare()`` and the jobs;
such an option is supplied by the caller, never set from the command line.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

ProgressFn = Callable[[float, int | None, str], None]


def within(
    progress: ProgressFn | None, done: float, total: int | None, what: str, span: float = 1
) -> ProgressFn | None:
    """A callback for the sub-task ``what`` of step ``done`` of ``total``: it reports the outer
    counts, advanced by the sub-task's share done, with the sub-task's own counts in the
    description (``"randomization of occlusion: perturbed inputs 120/675"``). The sub-task is
    ``span`` outer units (a batch of images: its size)."""
    if progress is None:
        return None

    def inner(sub_done: float, sub_total: int | None, detail: str) -> None:
        share = min(max(sub_done / sub_total, 0.0), 1.0) if sub_total else 0.0
        counts = f"{sub_done:g}/{'?' if sub_total is None else sub_total}"
        text = f"{what}: {detail} {counts}" if detail else f"{what}: {counts}"
        progress(done + share * span, total, text)

    return inner


def accepts_progress(cls: type) -> bool:
    """Whether an explainer (``explain``) or metric (``compute``) takes a ``progress`` option."""
    function = getattr(cls, "explain", None) or getattr(cls, "compute", None)
    if function is None:
        return False
    parameter = inspect.signature(function).parameters.get("progress")
    return parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY


def settable(options) -> list[str]:
    """Option names a user sets, for listings: ``progress`` is supplied by the caller."""
    return [name for name in options if name != "progress"]


class Throughput:
    """Units per second and the time left of one job, from the ``done`` counts of its progress
    calls: the rate over the last ``window`` seconds (so that the start-up before the first
    unit, a Ray pool's say, does not count, and a change of pace shows within a window)."""

    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.clock = window, clock
        self.start = clock()
        self.points: deque[tuple[float, float]] = deque()

    def update(self, done: float) -> None:
        now = self.clock()
        if self.points and done < self.points[-1][1]:  # counted again from 0: a new phase
            self.points.clear()
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window:
            self.points.popleft()  # keep one point at least a window old

    @property
    def rate(self) -> float | None:
        """Units per second, or ``None`` before two progress calls apart in time and count."""
        if len(self.points) < 2:
            return None
        (t0, d0), (t1, d1) = self.points[0], self.points[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else None

    def left(self, done: float, total: int | None) -> float | None:
        """Seconds left at the current rate (at the average since the start before a rate)."""
        if not total or not 0 < done < total:
            return None
        rate = self.rate or done / max(self.clock() - self.start, 1e-9)
        return (total - done) / rate


def seconds_text(value: float) -> str:
    return f"{value:.0f} s" if value < 90 else f"{value / 60:.1f} min"


def status_line(
    title: str, done: float, total: int | None, what: str, throughput: Throughput, unit: str
) -> str:
    """The one plain-text progress line: ``"audit (gradcam): 120/2000 (6%) gradcam: images;
    35.2 images/s, 4 s elapsed, about 53 s left"`` (the rate once there is one)."""
    counts = f"{int(done)}/{'?' if total is None else total}"
    if total:
        counts += f" ({int(100 * done / total)}%)"
    rate = throughput.rate
    speed = "" if rate is None else f"{rate:.3g} {unit}/s, "
    elapsed = seconds_text(throughput.clock() - throughput.start)
    left = throughput.left(done, total)
    eta = "" if left is None else f", about {seconds_text(left)} left"
    return f"{title}: {counts} {what}; {speed}{elapsed} elapsed{eta}"


class LineProgress:
    """A ``progress`` callback that prints :func:`status_line` to ``file`` (stderr) every
    ``interval`` seconds or 10 % of the work, whichever comes first: what ``xai`` prints off a
    terminal, and what a script or a notebook can pass, e.g.
    ``audit(..., progress=LineProgress("audit"))``. ``unit`` names what ``done`` counts."""

    def __init__(
        self,
        title: str,
        *,
        unit: str = "images",
        interval: float = 5.0,
        file: TextIO | None = None,
        clean: Callable[[str], str] = str,
    ) -> None:
        self.title, self.unit, self.interval, self.file, self.clean = (
            title, unit, interval, file, clean,
        )  # fmt: skip
        self.throughput = Throughput()
        self.last = self.throughput.start
        self.last_tenth = -1

    def __call__(self, done: float, total: int | None, what: str) -> None:
        self.throughput.update(done)
        now = self.throughput.clock()
        tenth = int(done * 10 / total) if total else -1
        if now - self.last < self.interval and tenth <= self.last_tenth:
            return
        self.last, self.last_tenth = now, max(tenth, self.last_tenth)
        line = status_line(self.title, done, total, what, self.throughput, self.unit)
        print(self.clean(line), file=self.file or sys.stderr, flush=True)
