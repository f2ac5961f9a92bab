"""Where dataset work runs: executors map a batch step over a data source and merge the parts.

``audit()`` and ``explain_dataset()`` describe their work as a *step*, a picklable callable that
turns one
:class:`~xai_core.workflows.datasets.Batch` into a partial result, and partial results that
merge with ``+`` (:class:`Partial` around the per-class running sums,
:class:`~xai_core.workflows.datasets.ClassMaps`):
merging the parts of any split of the data gives the
result of one pass over all of it (exactly, for the same order of additions). An executor
decides where the steps run and how the parts are merged:

* ``map(step, batches)`` yields ``step(batch)`` for each batch, in any order;
* ``reduce(parts)`` merges the parts with ``+`` (``None`` when there are none).

:func:`run` maps and reduces; :func:`parts` maps only, for a caller that consumes each part
as it comes (``xai explain`` writes each batch's outputs and keeps none in memory).

A stream of files (:class:`~xai_core.workflows.datasets.DataStream` over a folder) also has a
``read_plan()``: picklable chunks of paths to read and preprocess anywhere, and the driver-side
grouping of what was read into the batches one pass makes. An executor may use it to read the
files on its workers (the Ray executor does: only paths go out, and the decoded images never
pass through the calling process); iterating the stream reads them here through the same plan,
so both see the same batches.

The core's :class:`LocalExecutor` (``engine="local"``, the default) runs them one after the
other in this process. A plugin adds others with the ``register_executors`` hook (a Ray or
process-pool executor, say); users pick one by name: ``audit(..., engine="ray")``. A step holds
the model adapter; the adapters pickle (the ONNX one reopens its session), and the registry
pickles as what it loaded (:meth:`~xai_core.core.registry.Registry.snapshot`), rebuilt in a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from xai_core.core.errors import OptionError
from xai_core.core.progress import ProgressFn
from xai_core.core.registry import get_registry

DEFAULT_ENGINE = "local"


@runtime_checkable
class Executor(Protocol):
    """What ``register_executors`` takes (a class with these, instantiated without arguments)."""

    name: str

    def map(self, step: Callable[[Any], Any], batches: Iterable[Any]) -> Iterator[Any]:
        """``step(batch)`` for every batch of ``batches``, yielded as each is done."""
        ...

    def reduce(self, parts: Iterable[Any]) -> Any:
        """The parts merged with ``+``; ``None`` for no parts."""
        ...


class LocalExecutor:
    """One batch after the other, in this process, merged in order: the default engine."""

    name = DEFAULT_ENGINE

    def map(self, step: Callable[[Any], Any], batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            yield step(batch)

    def reduce(self, parts: Iterable[Any]) -> Any:
        total = None
        for part in parts:  # in place where the part allows it (``+=``): one running sum
            if total is None:
                total = part
            else:
                total += part
        return total


@dataclass
class Partial:
    """A step's mergeable result: ``value`` (anything with ``+``) over ``images`` images."""

    value: Any
    images: int

    def __add__(self, other: Partial) -> Partial:
        return Partial(self.value + other.value, self.images + other.images)

    def __iadd__(self, other: Partial) -> Partial:
        self.value += other.value  # in place when the value supports it
        self.images += other.images
        return self


def get_executor(engine: str | Executor) -> Executor:
    """The executor ``engine`` names (``xai plugins`` lists them), or ``engine`` itself."""
    if isinstance(engine, str):
        return get_registry().get_executor(engine)
    if isinstance(engine, Executor):
        return engine
    raise OptionError(
        f"engine must be an executor's name such as {DEFAULT_ENGINE!r}, or an object with map() "
        f"and reduce(); got {type(engine).__name__}."
    )


def parts(
    engine: str | Executor,
    step: Callable[[Any], Partial],
    batches: Iterable[Any],
    *,
    total: int | None = None,
    progress: ProgressFn | None = None,
    what: str = "images",
) -> Iterator[Partial]:
    """``step`` mapped over ``batches`` with ``engine``: the parts as they come back, unmerged
    (for a caller that writes each part, such as ``xai explain``). ``progress(done, total,
    what)`` is called as each part comes back, ``done`` counting its ``images``."""
    executor = get_executor(engine)
    done = 0
    for part in executor.map(step, batches):
        if not isinstance(part, Partial):
            raise TypeError(
                f"the executor {executor.name!r} yielded a {type(part).__name__}; map() must "
                f"yield what the step returned."
            )
        done += part.images
        if progress is not None:
            progress(done, total, what)
        yield part


def run(
    engine: str | Executor,
    step: Callable[[Any], Partial],
    batches: Iterable[Any],
    *,
    total: int | None = None,
    progress: ProgressFn | None = None,
    what: str = "images",
) -> Partial | None:
    """Map ``step`` over ``batches`` with ``engine`` and reduce the parts; ``None`` if there
    were no batches. ``progress(images_done, total, what)`` is called as each part comes back."""
    executor = get_executor(engine)
    return executor.reduce(
        parts(executor, step, batches, total=total, progress=progress, what=what)
    )
