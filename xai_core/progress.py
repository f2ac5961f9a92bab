"""The one progress protocol of xai-core: ``progress(done, total, what)``.

Every long job (explaining files, ``compare()``, ``audit()``, occlusion's perturbations, the
randomisation metric's cascade) reports through a callable of this type:

* ``done``: units of real work finished so far (inputs, images, perturbed inputs, stages...);
* ``total``: units in all, or ``None`` while unknown;
* ``what``: a short plain-text description of the work, e.g. ``"occlusion of img1.png"``.

It is called after each unit of work (or chunk of units), never required, and must be cheap: the
command line draws a bar on a terminal and prints periodic lines otherwise. Explainers and metrics
that accept a keyword-only ``progress`` option get one passed down by ``compare()`` and the jobs;
such an option is supplied by the caller, never set from the command line.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int | None, str], None]


def within(
    progress: ProgressFn | None, done: int, total: int | None, what: str
) -> ProgressFn | None:
    """A callback for the sub-task ``what`` of step ``done`` of ``total``: it reports the outer
    counts, with the sub-task's own counts in the description
    (``"randomization of occlusion: perturbed inputs 120/675"``)."""
    if progress is None:
        return None

    def inner(sub_done: int, sub_total: int | None, detail: str) -> None:
        counts = f"{sub_done}/{'?' if sub_total is None else sub_total}"
        progress(done, total, f"{what}: {detail} {counts}" if detail else f"{what}: {counts}")

    return inner


def accepts_progress(cls: type) -> bool:
    """Whether an explainer (``explain``) or metric (``compute``) takes a ``progress`` option."""
    import inspect

    function = getattr(cls, "explain", None) or getattr(cls, "compute", None)
    if function is None:
        return False
    parameter = inspect.signature(function).parameters.get("progress")
    return parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY
