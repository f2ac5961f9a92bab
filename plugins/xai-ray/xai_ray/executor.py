"""``RayExecutor``: the batch steps of ``audit()`` / ``explain_dataset()`` on a pool of Ray actors.

How a run goes (docs/scale.md):

1. Connect: to ``address`` (``"auto"``, ``"ray://head:10001"``) or, without one and when this
   process is not connected yet, start a local Ray in-process: ``workers`` CPUs, no dashboard, no
   usage statistics, its files in a temp dir under the system's (:func:`tempfile.gettempdir`).
2. Each actor starts by rebuilding the registry from this process's snapshot
   (:meth:`~xai_core.core.registry.Registry.snapshot`): the same plugins. The step (the model's
   adapter, the method, its options) goes into the object store once; each actor fetches it
   once, with its first batch (and once more after a restart).
3. Batches go to the actors in turn, at most ``workers x in_flight`` out at a time beyond those
   merged (backpressure: a dataset larger than memory streams through); the parts come back
   **in batch order**, whatever order the actors finish in, so the
   reduce adds them in the order the local engine does and the sums are bitwise the same.
   A stream of files is read by the actors: chunks of paths go out, the decoded images stay in
   the workers' object store, and the driver groups the chunks into the local pass's batches
   from their sizes alone (:meth:`RayExecutor._map_files`).
4. A Ray Data ``Dataset`` (``audit(model, ds, engine="ray")``) is run by Ray Data itself
   (:meth:`RayExecutor._map_dataset`): ``map_batches`` on a pool of ``workers`` actors, each
   rebuilding the registry and holding the step, turns each batch of rows into the core's batch
   (:class:`~xai_core.workflows.datasets.RowBatches`), runs the step and returns the part
   serialised in a column. The parts come back in the dataset's order, but Ray Data cuts the
   batches (and its workers run torch on one thread): the sums equal the local engine's within
   rounding (1e-6), the counts exactly.
5. An actor whose process dies is restarted (it gets the step again) and its in-flight batches
   are retried, ``max_retries`` times (on Ray Data's pool too); the batches other actors hold
   are not affected.

Ray is imported only when an instance is made: without Ray installed that raises
:class:`~xai_core.core.errors.MissingDependencyError` saying what to install.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import secrets
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from xai_core.core.errors import ExecutorError, MissingDependencyError, OptionError
from xai_core.core.executors import LocalExecutor
from xai_core.core.registry import Registry, RegistrySnapshot, get_registry

RAY_REQUIREMENT = "ray==2.60.0"
# What the user may have chosen about Ray's token authentication (we never override it).
_AUTH_SETTINGS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
INSTALL = f"pip install 'xai-core[ray]' (or: pip install xai-ray '{RAY_REQUIREMENT}')"


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`MissingDependencyError` saying what to install."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise MissingDependencyError(
            f"engine='ray' needs Ray, which is not installed: {INSTALL}. Without it, use the "
            f"default engine (engine='local', no --engine on the command line)."
        ) from exc


class RayExecutor(LocalExecutor):
    """Batch steps on ``workers`` Ray actors, parts merged in batch order (``engine="ray"``).

    :param workers: actors in the pool; for a local Ray started here also its CPUs. Default:
        one per CPU of the cluster (per ``gpus_per_worker`` GPU when that is set).
    :param address: an existing cluster (``"auto"``, ``"ray://host:10001"``); ``None`` starts a
        local Ray in this process unless one is already connected.
    :param gpus_per_worker: GPUs (a fraction is fine) each actor reserves; Ray makes them the
        actor's visible devices, and a model sent on a GPU lands on the actor's.
    :param in_flight: batches each actor holds at most (queued or running).
    :param max_retries: restarts of a dead actor, and retries of the batches it held.
    :param object_store_memory: bytes of the object store of a local Ray started here (Ray's
        default otherwise: 30% of the memory); the in-flight bound keeps a run within it.
    """

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        gpus_per_worker: float = 0.0,
        in_flight: int = 2,
        max_retries: int = 3,
        object_store_memory: int | None = None,
    ) -> None:
        for label, value, low in (("workers", workers, 1), ("in_flight", in_flight, 1)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < low
            ):
                raise OptionError(f"{label} must be an int >= {low}; got {value!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise OptionError(f"max_retries must be an int >= 0; got {max_retries!r}.")
        if (
            isinstance(gpus_per_worker, bool)
            or not isinstance(gpus_per_worker, int | float)
            or not math.isfinite(gpus_per_worker)
            or gpus_per_worker < 0
        ):
            raise OptionError(f"gpus_per_worker must be a number >= 0; got {gpus_per_worker!r}.")
        if object_store_memory is not None and (
            isinstance(object_store_memory, bool)
            or not isinstance(object_store_memory, int)
            or object_store_memory < 80 * 2**20
        ):
            raise OptionError(
                f"object_store_memory must be a number of bytes >= 80 MiB (Ray's minimum is 75 "
                f"MiB); got {object_store_memory!r}."
            )
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise OptionError(
                f"address must be 'auto' or a cluster address such as 'ray://head:10001'; got "
                f"{address!r}."
            )
        self.workers = workers
        self.address = address
        self.gpus_per_worker = float(gpus_per_worker)
        self.in_flight = in_flight
        self.max_retries = max_retries
        self.object_store_memory = object_store_memory
        self._ray = import_ray()

    def __repr__(self) -> str:
        return (
            f"RayExecutor(workers={self.workers!r}, address={self.address!r}, "
            f"gpus_per_worker={self.gpus_per_worker!r})"
        )

    # -- the cluster ---------------------------------------------------------------------------

    def connect(self) -> Any:
        """Connect to ``address``, or start a local Ray here (Ray's context; ``None`` when this
        process was already connected)."""
        ray = self._ray
        if ray.is_initialized():
            return None
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # never report usage (inherited by Ray)
        if self.address is not None:
            return ray.init(address=self.address, log_to_driver=False)
        if not any(os.environ.get(v) for v in _AUTH_SETTINGS):
            # A new local Ray requires a token and would save one in ~/.ray: give it one for
            # this process and its workers instead, so nothing is written outside the temp dir.
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        return ray.init(
            num_cpus=self.workers,
            object_store_memory=self.object_store_memory,
            include_dashboard=False,
            log_to_driver=False,
            # Ray's own sockets and logs: under the system temp dir, never the user's folders.
            _temp_dir=os.path.join(tempfile.gettempdir(), f"xai-ray-{os.getuid()}"),
        )

    def pool_size(self) -> int:
        """How many actors a run starts: ``workers``, or what the cluster's resources allow."""
        resources = self._ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if self.workers is None:
            if self.gpus_per_worker:
                return max(1, min(cpus, int(gpus // self.gpus_per_worker)))
            return max(1, cpus)
        # An actor the cluster cannot place would wait forever, and its batches with it.
        if self.workers > cpus or self.workers * self.gpus_per_worker > gpus:
            raise OptionError(
                f"{self.workers} workers need {self.workers} CPUs and "
                f"{self.workers * self.gpus_per_worker:g} GPUs; the Ray cluster has {cpus} CPUs "
                f"and {gpus:g} GPUs. Ask for fewer workers (--workers) or add nodes."
            )
        return self.workers

    def start_pool(self) -> list[Any]:
        """``pool_size()`` actors, each with the registry rebuilt from this process's."""
        self.connect()
        actor = _actor_class(self._ray).options(
            num_cpus=1,
            num_gpus=self.gpus_per_worker,
            max_restarts=self.max_retries,
            max_task_retries=self.max_retries,
        )
        snapshot = get_registry().snapshot()
        return [actor.remote(snapshot) for _ in range(self.pool_size())]

    # -- the protocol --------------------------------------------------------------------------

    def map(self, step: Callable[[Any], Any], batches: Iterable[Any]) -> Iterator[Any]:
        """``step(batch)`` on the actors, yielded in batch order (so the reduce is the local
        engine's running sum in the same order: bitwise the same result). A stream of files
        (one with a ``read_plan()``) is read by the actors themselves (:meth:`_map_files`)."""
        plan = getattr(batches, "read_plan", None)
        plan = plan() if callable(plan) else None
        if plan is not None:
            yield from self._map_files(step, plan)
            return
        rows = getattr(batches, "ray_dataset", None)
        if callable(rows):  # connected first: a Dataset's first row is taken on this Ray
            self.connect()
            rows = rows()
        else:
            rows = None
        if rows is not None:
            yield from self._map_dataset(step, *rows, failed=batches.failed)
            return
        ray = self._ray
        actors = self.start_pool()
        # The step (model, method, options) goes into the object store once; an actor fetches
        # it on its first batch, and again only after a restart. Inside a list, so that Ray
        # hands the actors the reference, not the step, with every batch.
        step_ref = [ray.put(step)]
        window = len(actors) * self.in_flight
        pending: deque[Any] = deque()
        try:
            for index, batch in enumerate(batches):
                if len(pending) >= window:  # backpressure: wait for the oldest batch
                    yield self._result(pending.popleft())
                pending.append(actors[index % len(actors)].run.remote(batch, step_ref))
            while pending:
                yield self._result(pending.popleft())
        finally:  # also when the caller stops early or a step raised
            self._stop(pending, actors)

    def _map_files(self, step: Callable[[Any], Any], plan: Any) -> Iterator[Any]:
        """A stream of files: the actors read them, this process sees only paths and sizes.

        Chunk ``k`` of the files is read (decoded, preprocessed) by actor ``k mod n``; its arrays
        stay in that node's object store, and only what was read (keys, shapes, failures) comes
        back here. The plan groups those into the batches one local pass makes (the same
        images, even around corrupt files), and each batch goes to an actor with references to
        its chunks' arrays (mostly its own: the chunk it read). At most ``workers x in_flight``
        chunks are being read ahead and as many batches are out: the object store holds a
        bounded number of decoded batches, whatever the dataset's size."""
        ray = self._ray
        actors = self.start_pool()
        step_ref = [ray.put(step)]
        window = len(actors) * self.in_flight
        reads: deque[tuple[int, Any, Any]] = deque()  # (chunk, meta ref, arrays ref)
        arrays: dict[int, Any] = {}  # the chunks that batches still need
        pending: deque[Any] = deque()
        chunks = iter(enumerate(plan.chunks))

        def read_ahead() -> None:
            while len(reads) < window:
                index, chunk = next(chunks, (None, None))
                if chunk is None:
                    return
                actor = actors[index % len(actors)]
                meta, data = actor.read.options(num_returns=2).remote(chunk)
                reads.append((index, meta, data))

        def send(specs: list[Any]) -> Iterator[Any]:
            for spec in specs:
                if len(pending) >= window:  # backpressure: wait for the oldest batch
                    yield self._result(pending.popleft())
                refs = [arrays[c] for c in spec.chunks]
                actor = actors[min(spec.chunks) % len(actors)]  # the reader of its first chunk
                pending.append(actor.run_batch.remote(spec, step_ref, *refs))

        try:
            read_ahead()
            while reads:
                index, meta, data = reads.popleft()
                arrays[index] = data
                yield from send(plan.add(index, self._result(meta)))
                for done in [c for c in arrays if c not in plan.open_chunks()]:
                    del arrays[done]  # this process's reference: freed once its batch ran
                read_ahead()
            yield from send(plan.finish())
            arrays.clear()
            while pending:
                yield self._result(pending.popleft())
        finally:
            self._stop([*pending, *(ref for _, ref, _ in reads)], actors)

    def _map_dataset(
        self, step: Callable[[Any], Any], dataset: Any, rows: Any, failed: dict[str, str]
    ) -> Iterator[Any]:
        """A Ray Data ``Dataset``: Ray Data batches its rows and runs the step on ``workers``
        actors of its own (``map_batches``); each batch's part comes back pickled in a column,
        its failed rows go to ``failed``. Ray Data's streaming keeps a bounded number of
        batches in flight; the parts come in the dataset's order."""
        from xai_core.workflows.datasets import record_failures  # the workflows' own

        ray = self._ray
        data = importlib.import_module("ray.data")  # connected: map() took the first row
        with warnings.catch_warnings():
            # Ray Data's default is to restart a dead actor and retry its batches forever (a
            # batch that kills its worker every time is a run that never ends); the only way
            # to bound it in Ray 2.60 is the actor options, deprecated as `ray_remote_args` for
            # Ray 2.64, which will need its named replacement.
            warnings.simplefilter("ignore", DeprecationWarning)  # RayDeprecationWarning
            parts = dataset.map_batches(
                _DatasetStep,
                fn_constructor_args=(get_registry().snapshot(), step, rows),
                batch_size=rows.batch_size,
                batch_format="numpy",
                # Up to `workers` actors, grown by Ray Data as CPUs are free: the dataset's own
                # read and map tasks keep CPUs (a fixed pool on every CPU left them none: a
                # deadlock); each holds at most `in_flight` batches, as on the other paths.
                compute=data.ActorPoolStrategy(
                    min_size=1,
                    max_size=self.pool_size(),
                    max_tasks_in_flight_per_actor=self.in_flight,
                ),
                num_cpus=1,
                num_gpus=self.gpus_per_worker or None,
                max_restarts=self.max_retries,
                max_task_retries=self.max_retries,
            )
        # In the dataset's order, whatever order the batches finish in: a comparison's samples
        # are numbered as they come, and a rerun adds an audit's parts in the same order. The
        # setting is the dataset's (its context is shared with the user's): put back after.
        options = parts.context.execution_options
        preserve_order, options.preserve_order = options.preserve_order, True
        try:
            for row in parts.iter_rows():
                if row["error"]:  # the step's exception, raised here as the local engine would
                    raise pickle.loads(row["error"])
                record_failures(failed, json.loads(row["failed"]))
                if row["part"]:
                    yield pickle.loads(row["part"])
        except ray.exceptions.RayActorError as exc:  # died beyond max_retries
            raise self._worker_died(exc) from exc
        finally:
            options.preserve_order = preserve_order

    def _stop(self, pending: Iterable[Any], actors: list[Any]) -> None:
        for ref in pending:  # batches nobody will merge: not retried, not reported
            self._ray.cancel(ref)
        for actor in actors:
            self._ray.kill(actor, no_restart=True)

    def _result(self, ref: Any) -> Any:
        """A part, or the step's own exception (an ``OptionError`` stays one, with its message
        alone, not wrapped in Ray's traceback text)."""
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from exc
            raise
        except self._ray.exceptions.RayActorError as exc:
            raise self._worker_died(exc) from exc

    def _worker_died(self, exc: Exception) -> ExecutorError:
        return ExecutorError(
            f"A Ray worker died while explaining a batch, and the batch could not be redone "
            f"(max_retries={self.max_retries}: restarts of a worker and retries of its "
            f"batches). Allow more with RayExecutor(max_retries=...), or look at the worker's "
            f"memory (a worker killed for memory dies again). Ray said: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        )

    # reduce(): the local engine's running sum (parts come in batch order, see map()).


def use_registry(snapshot: RegistrySnapshot) -> None:
    """Make this (worker) process's registry the one ``snapshot`` describes: the same plugins
    as the driver's, whatever this process's environment would load."""
    from xai_core.core import registry as registry_module

    with registry_module._registry_lock:  # the process-wide registry has no public setter
        registry_module._registry = Registry.from_snapshot(snapshot)


class _Worker:
    """One actor: the registry rebuilt when it starts, the step fetched once, on first use."""

    def __init__(self, snapshot: RegistrySnapshot) -> None:
        use_registry(snapshot)
        self.step: Callable[[Any], Any] | None = None
        self.step_id: str | None = None

    def run(self, batch: Any, step_ref: list[Any]) -> Any:
        ref = step_ref[0]
        if self.step_id != ref.hex():  # the first batch of a run, or the first after a restart
            self.step = import_ray().get(ref)
            self.step_id = ref.hex()
        return self.step(batch)

    def read(self, chunk: Any) -> tuple[Any, Any]:
        """Read a chunk of files here (a ``ReadChunk``): what was read, and the arrays."""
        return chunk()

    def run_batch(self, spec: Any, step_ref: list[Any], *arrays: Any) -> Any:
        """The batch ``spec`` describes, built from its chunks' arrays, through the step."""
        return self.run(spec.build(*arrays), step_ref)

    def pid(self) -> int:
        return os.getpid()


class _DatasetStep:
    """Ray Data's callable class for a Dataset (one instance per actor): the registry rebuilt
    and the step held once; each numpy batch of rows in, one row out: the pickled part (empty
    when every row failed), the failed rows (JSON) and the step's exception, if it raised."""

    def __init__(self, snapshot: RegistrySnapshot, step: Callable[[Any], Any], rows: Any) -> None:
        use_registry(snapshot)
        self.step, self.rows = step, rows

    def __call__(self, columns: dict[str, Any]) -> dict[str, Any]:
        part, failed, error = b"", {}, b""
        try:
            batch, failed = self.rows(columns)
            if batch is not None:
                part = pickle.dumps(self.step(batch))
        except Exception as exc:  # reported to the driver, raised there
            try:
                error = pickle.dumps(exc)
            except Exception:  # an exception that does not pickle
                error = pickle.dumps(ExecutorError(f"{type(exc).__name__}: {exc}"))
        return {
            "part": np.array([part], dtype=object),
            "failed": np.array([json.dumps(failed)]),
            "error": np.array([error], dtype=object),
        }


_ACTOR: Any = None


def _actor_class(ray: Any) -> Any:
    """The Ray actor class of :class:`_Worker` (made once, when Ray is imported)."""
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(_Worker)
    return _ACTOR
