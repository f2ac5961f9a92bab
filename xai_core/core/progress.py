"""The one progress protocol of xai-core: ``progress(done, total, what)``.

Every long job (explaining files, ``compare()``, ``audit()``, occlusion's perturbations, the
randomisation metric's cascade) reports through a callable of this type:

* ``done``: units of real work finished so far (inputs, images, perturbed inputs, stages...);
  a float between two units while a sub-task of the next one reports its own counts
  (:func:`within`), so that a bar moves and an ETA exists even for one long input;
* ``total``: units in all, or ``None`` while unknown;
* ``what``: a short plain-text description of the work, e.g. ``"occlusion of img1.png"``.

It is called after each unit of work (or chunk of units), never required, and must be cheap: the
command line draws a bar on a terminal and prints periodic lines otherwise. Explainers and metrics
that accept a keyword-only ``progress`` option get one passed down by ``compare()`` and the jobs;
such an option is supplied by the caller, never set from the command line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

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
