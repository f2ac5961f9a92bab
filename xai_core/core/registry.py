"""Finding plugins, guarding against broken ones, and looking up what they registered.

Plugins are found through the ``xai_core`` entry-point group, the built-in explainers exactly
like a third-party plugin. Unlike pluggy's ``load_setuptools_entrypoints`` each entry point is
loaded on its own: a plugin that fails to import or whose hook raises is recorded as a
:class:`PluginFailure` (name, distribution, version, error), a warning is issued, and every other
plugin keeps working. A hook's registrations count only if the hook returns normally.

What a plugin cannot do (docs/architecture.md, "Plugin precedence"):

* stop loading: any exception, ``SystemExit``, ``GeneratorExit`` or a ``KeyboardInterrupt`` it
  raises itself is that plugin's failure; only a real Ctrl-C (a SIGINT that arrived while the
  plugin ran) propagates;
* replace a built-in: a name registered by a built-in distribution (:data:`BUILTIN_DISTRIBUTIONS`)
  and by a third-party plugin stays the built-in's, the duplicate is refused and listed; a
  built-in ``xai`` command cannot be replaced; PyTorch modules and ONNX models are adapted by the
  core, plugins are asked only for other objects;
* return a malformed result unnoticed (:mod:`xai_core.core.contract`).

The registry is thread-safe: entry points load once, under a lock, and the lookups are cached
under the same lock.

Environment variables:

* ``XAI_CORE_PLUGINS``: comma-separated allow-list of plugin (entry-point) or distribution names;
  when set, nothing else loads.
* ``XAI_CORE_BLOCK_PLUGINS``: comma-separated names never to load.
* ``XAI_CORE_TRACE=1``: log every hook call, with its plugin and duration, to stderr.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import TYPE_CHECKING, Any

import pluggy

from xai_core.core import hookspecs
from xai_core.core.adapters import ModelAdapter, check_protocols, describe_gaps, protocol_gaps
from xai_core.core.errors import (
    InputFileError,
    ModelError,
    ModelTypeError,
    PluginConflictError,
    PluginError,
    UnknownMethodError,
    XaiError,
    did_you_mean,
)
from xai_core.core.hookspecs import PROJECT
from xai_core.core.metrics import check_metric_class
from xai_core.core.tags import Capability, Dependence, Scope, Tags
from xai_core.core.types import NAME, ExplainerInfo, PluginInfo, check_registered_class

if TYPE_CHECKING:
    import typer

ENV_ALLOW = "XAI_CORE_PLUGINS"
ENV_BLOCK = "XAI_CORE_BLOCK_PLUGINS"
ENV_TRACE = "XAI_CORE_TRACE"

# The first-party distributions under plugins/: the one place that says what is built in. A name
# one of them registers cannot be taken over by a third-party plugin (see _apply_precedence).
BUILTIN_DISTRIBUTIONS = frozenset(
    {
        "xai-attention",
        "xai-cam",
        "xai-global",
        "xai-gradcam",
        "xai-gradients",
        "xai-metrics",
        "xai-occlusion",
        "xai-ray",
    }
)
# The core registers its own model loaders, readers and the local executor as a plugin of this
# name (xai_core/core_plugin.py), asked before any other; it counts as built in.
CORE_PLUGIN = "xai-core"

trace_log = logging.getLogger("xai_core.hooks")


_ADAPTER_NOTE = "(asked only for models that are neither torch.nn.Module nor ONNX)"


class PluginWarning(UserWarning):
    """A plugin was skipped because it is broken; see ``xai plugins`` for details."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin, or one class or command it registered, that could not be used."""

    plugin: str
    distribution: str | None
    version: str | None
    stage: str  # "import", "register", or the name of the hook that raised
    error: str
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.plugin,
            "kind": "plugin",
            "scope": None,
            "dependence": None,
            "plugin": self.distribution or self.plugin,
            "version": self.version,
            "status": "error",
            "stage": self.stage,
            "error": self.error,
        }


@dataclass(frozen=True)
class RegistrySnapshot:
    """What a registry loaded, to rebuild it in another process (:meth:`Registry.snapshot`).

    ``plugins`` are the entry points loaded, ``skipped`` those left out by the allow/block
    lists, ``not_rebuilt`` in-process plugins (they cannot be loaded again elsewhere).
    """

    group: str | None
    plugins: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    not_rebuilt: tuple[str, ...] = ()


@dataclass
class _Entry:
    cls: type
    source: PluginInfo


def is_builtin(source: PluginInfo) -> bool:
    """Whether ``source`` is a first-party distribution (:data:`BUILTIN_DISTRIBUTIONS`)."""
    dist = source.distribution
    if dist is None:
        return False
    dist = re.sub(r"[-_.]+", "-", dist).lower()
    return dist in BUILTIN_DISTRIBUTIONS or (dist == CORE_PLUGIN and source.plugin == CORE_PLUGIN)


def describe_exception(exc: BaseException) -> str:
    """``Type: message``, also for an exception whose ``__str__`` itself raises."""
    try:
        text = str(exc)
    except BaseException:  # a plugin's broken __str__ must not break the registry
        text = "<the exception's message could not be printed>"
    return f"{type(exc).__name__}: {text}"


@contextmanager
def _sigint_watch() -> Iterator[list[bool]]:
    """Note whether a real SIGINT (Ctrl-C) arrives while plugin code runs.

    A ``KeyboardInterrupt`` is the user's only if the interpreter's SIGINT handler fired; one a
    plugin raises itself is that plugin's failure. Signal handlers exist only in the main thread:
    elsewhere every ``KeyboardInterrupt`` comes from code, and the flag stays False.
    """
    hit = [False]
    previous = None
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGINT)
        if callable(current):  # SIG_DFL kills the process and SIG_IGN ignores: nothing to tell

            def chained(signum: int, frame: Any) -> Any:
                hit[0] = True
                return current(signum, frame)

            signal.signal(signal.SIGINT, chained)
            previous = current
    try:
        yield hit
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def explainer_options(cls: type) -> dict[str, inspect.Parameter]:
    """The options an explainer accepts: the keyword-only parameters of its ``explain``."""
    params = inspect.signature(cls.explain).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_explainer_class(cls: Any) -> None:
    """Raise PluginError when ``cls`` breaks the Explainer protocol (said in words)."""
    check_registered_class(cls, "explainer", "explain", "gradcam")
    if not isinstance(getattr(cls, "tags", None), Tags):
        raise PluginError(f"{cls.__qualname__}.tags must be an xai_core.Tags instance.")
    summary = getattr(cls, "summary", None)
    if summary is not None and not isinstance(summary, str):
        raise PluginError(f"{cls.__qualname__}.summary must be a str; got {summary!r}.")
    params = [
        p
        for p in inspect.signature(cls.explain).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < 4:  # self, model, inputs, targets
        raise PluginError(
            f"{cls.__qualname__}.explain must accept (self, model, inputs, targets, *, options...)."
        )


def _qualname(obj: Any) -> str:
    """A registered class's qualified name, or its class's for an instance."""
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


def _check_named(obj: Any, what: str, methods: tuple[str, ...]) -> None:
    """Raise PluginError when a reader or executor (class or instance) lacks its parts."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not NAME.match(name):
        raise PluginError(
            f"{_qualname(obj)}.name must be a lower-case identifier (the {what}'s name); "
            f"got {name!r}."
        )
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise PluginError(f"{_qualname(obj)} is not a {what}: it has no {', '.join(missing)}().")


def _check_reader(obj: Any) -> None:
    _check_named(obj, "reader", ("claims", "read"))


def _check_executor(obj: Any) -> None:
    _check_named(obj, "executor", ("map", "reduce"))


def _instance(obj: Any) -> Any:
    return obj() if isinstance(obj, type) else obj


def _names_from_env(var: str) -> set[str]:
    return {n.strip() for n in os.environ.get(var, "").split(",") if n.strip()}


def _command_name(info: Any) -> str | None:
    """The name typer gives a registered command or sub-app (``None`` when it has none)."""
    from typer.main import get_command_name  # typer only when the CLI builds its commands
    from typer.models import DefaultPlaceholder

    def given(value: Any) -> Any:
        return None if isinstance(value, DefaultPlaceholder) else value

    if hasattr(info, "typer_instance"):  # a sub-app added with add_typer()
        sub = given(info.typer_instance)
        name = given(info.name) or (sub and given(sub.info.name))
        callback = given(info.callback) or (
            sub and sub.registered_callback and sub.registered_callback.callback
        )
    else:
        name, callback = info.name, info.callback
    if name:
        return name
    return get_command_name(callback.__name__) if callback is not None else None


class Registry:
    """Plugins, what they registered, and what failed. Loads entry points lazily, once."""

    def __init__(
        self,
        *,
        entry_points_group: str | None = PROJECT,
        allow: Iterable[str] | None = None,
        block: Iterable[str] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.group = entry_points_group
        # Explicit allow/block lists (a rebuilt registry, see from_snapshot) replace the env's.
        self._allow = None if allow is None else frozenset(allow)
        self._block = None if block is None else frozenset(block)
        self._entry_point_names: list[str] = []  # plugins loaded from entry points, in order
        self.failures: list[PluginFailure] = []
        self.skipped: list[str] = []  # plugins not loaded because of the env allow/block lists
        self.commands: dict[str, PluginInfo] = {}  # `xai` sub-commands added by plugins
        self._sources: dict[str, PluginInfo] = {}
        self._explainers: dict[str, list[_Entry]] | None = None
        self._metrics: dict[str, list[_Entry]] | None = None
        self._loaded = False
        self._loading = False  # true while this registry imports entry points
        self._collecting: set[str] = set()  # hooks being collected (to refuse re-entry)
        # One re-entrant lock guards loading, the caches and the failure list: a plugin's import
        # may itself call the registry (same thread), other threads wait for the first load.
        self._lock = threading.RLock()
        self._local = threading.local()
        self._unwarned: list[PluginFailure] = []
        self._readers: dict[str, list[_Entry]] | None = None
        self._executors: dict[str, list[_Entry]] | None = None
        self._reader_list: list[tuple[str, Any, PluginInfo]] | None = None
        self._register_core()

    def _register_core(self) -> None:
        """The core's own adapters, loaders, readers and executor (:mod:`xai_core.plugin`): a
        plugin registered before all others and always asked first."""
        # The one import from this layer upwards: the core's plugin wires the torch, ONNX and
        # io layers in, as an entry point would (listed in the import-linter contract).
        from xai_core import plugin as core_plugin

        try:
            core_version = version(CORE_PLUGIN)
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            core_version = None
        self.pm.register(core_plugin, name=CORE_PLUGIN)
        self._core = core_plugin
        self._sources[CORE_PLUGIN] = PluginInfo(CORE_PLUGIN, CORE_PLUGIN, core_version)

    # -- rebuilding in another process -------------------------------------------------------

    def snapshot(self) -> RegistrySnapshot:
        """What this registry loaded, so a worker process can rebuild the same registry
        (:meth:`from_snapshot`) by loading those entry points again. In-process plugins
        (:meth:`register_plugin`) live in this process only: they are listed, not rebuilt."""
        self.load()
        with self._locked():
            loaded = tuple(self._entry_point_names)
            others = tuple(n for n in self._sources if n not in loaded and n != CORE_PLUGIN)
            return RegistrySnapshot(self.group, loaded, tuple(self.skipped), others)

    @classmethod
    def from_snapshot(cls, snapshot: RegistrySnapshot) -> Registry:
        """A registry that loads exactly the entry points ``snapshot`` names (whatever the
        environment's allow/block lists say in this process)."""
        return cls(
            entry_points_group=snapshot.group,
            allow=snapshot.plugins,
            block=snapshot.skipped,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (e.g. sent to a worker): rebuilt there from its entry points, never copied.
        return (Registry.from_snapshot, (self.snapshot(),))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock; warn about new failures once this thread leaves its outermost hold.

        Warnings wait until the state is consistent: with warnings turned into errors, the
        exception then leaves a fully loaded registry behind, not a half-loaded one.
        """
        with self._lock:
            self._local.depth = getattr(self._local, "depth", 0) + 1
            try:
                yield
            finally:
                self._local.depth -= 1
        if not self._local.depth:
            with self._lock:
                pending, self._unwarned = self._unwarned, []
            for failure in pending:
                where = (
                    f"{failure.plugin} ({failure.distribution} {failure.version})"
                    if failure.distribution
                    else failure.plugin
                )
                warnings.warn(
                    f"xai-core skipped plugin {where} at {failure.stage}: {failure.error}",
                    PluginWarning,
                    stacklevel=4,
                )

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load every allowed entry point of the group, each in its own guard (once).

        Thread-safe: a second thread waits for the first one's load instead of seeing a
        half-filled registry. A plugin whose import calls back into the registry sees what is
        loaded so far (and nothing of it is cached, see :meth:`_cached`).
        """
        if self._loaded:
            return
        with self._locked():
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                if self.group is not None:
                    self._load_entry_points(self.group)
            except BaseException:  # a real Ctrl-C: forget the partial load, the next call redoes it
                for name in list(self._sources):
                    if name != CORE_PLUGIN and self.pm.has_plugin(name):
                        self.pm.unregister(name=name)
                core = self._sources[CORE_PLUGIN]
                self._sources.clear()
                self._sources[CORE_PLUGIN] = core
                self._entry_point_names.clear()
                self.failures.clear()
                self.skipped.clear()
                self._unwarned.clear()
                raise
            else:
                self._loaded = True
            finally:
                self._loading = False
                self._invalidate()

    def _load_entry_points(self, group: str) -> None:
        allow = self._allow if self._allow is not None else _names_from_env(ENV_ALLOW) or None
        block = self._block if self._block is not None else _names_from_env(ENV_BLOCK)
        found = entry_points(group=group)
        # Built-ins first: a third-party entry point reusing a built-in's name is the refused one.
        order = sorted(found, key=lambda e: (e.name, not is_builtin(_source_of(e))))
        for ep in order:
            source = _source_of(ep)
            names = {ep.name, source.distribution}
            if (allow is not None and not names & allow) or names & block:
                self.skipped.append(ep.name)
                continue
            if self.pm.has_plugin(ep.name):
                other = self._sources.get(ep.name)
                self._fail(
                    source,
                    "import",
                    PluginError(
                        f"entry point {ep.name!r} is declared by both "
                        f"{other.distribution if other else '?'} and {source.distribution}; "
                        f"uninstall one."
                    ),
                )
                continue
            ok, obj = self._guarded(source, "import", ep.load)
            if ok:
                self._register(obj, source)
                if self.pm.has_plugin(ep.name):
                    self._entry_point_names.append(ep.name)

    def _guarded(
        self, source: PluginInfo, stage: str, function: Callable[..., Any], /, **kwargs: Any
    ) -> tuple[bool, Any]:
        """Run plugin code; ``(True, result)``, or ``(False, None)`` with the failure recorded.

        Any ``BaseException`` counts as the plugin's failure (``SystemExit`` from a plugin that
        calls ``sys.exit()``, ``GeneratorExit``, a ``KeyboardInterrupt`` it raises itself): only
        a real Ctrl-C of the user propagates.
        """
        start = time.perf_counter()
        with _sigint_watch() as interrupted:
            try:
                return True, function(**kwargs)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt) and interrupted[0]:
                    raise
                self._fail(source, stage, exc)
                return False, None
            finally:
                if stage not in ("import", "register"):
                    trace_log.debug(
                        "hook %s -> %s (%.1f ms)",
                        stage,
                        source.plugin,
                        1e3 * (time.perf_counter() - start),
                    )

    def register_plugin(
        self,
        plugin: object,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> str:
        """Register an in-process plugin (a module or object with hook implementations).

        For notebooks and tests: the plugin is treated exactly like one found by entry point.
        Returns the name it was registered under.
        """
        self.load()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._locked():
            self._register(plugin, PluginInfo(name, distribution, version))
            self._invalidate()
        return name

    def unregister_plugin(self, name: str) -> None:
        with self._locked():
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            self._sources.pop(name, None)
            self.failures = [f for f in self.failures if f.plugin != name]
            self._invalidate()

    def _register(self, obj: object, source: PluginInfo) -> None:
        def register() -> None:
            self.pm.register(obj, name=source.plugin)

        ok, _ = self._guarded(source, "register", register)  # pluggy checks hook signatures here
        if ok:
            self._sources[source.plugin] = source

    def _fail(self, source: PluginInfo, stage: str, exc: BaseException) -> None:
        failure = PluginFailure(
            source.plugin,
            source.distribution,
            source.version,
            stage,
            describe_exception(exc),
            exc,
        )
        with self._locked():
            if failure not in self.failures:  # a hook asked again fails again: report it once
                self.failures.append(failure)
                self._unwarned.append(failure)

    def _invalidate(self) -> None:
        with self._lock:
            self._explainers = None
            self._metrics = None
            self._readers = None
            self._executors = None
            self._reader_list = None

    def _source(self, plugin_name: str) -> PluginInfo:
        return self._sources.get(plugin_name, PluginInfo(plugin_name, None, None))

    def _plugin_impls(self, hook_name: str) -> list[Any]:
        """A hook's implementations in pluggy's call order (the last registered first), the
        core's own always first: a plugin's ``tryfirst`` cannot put it before the core."""
        impls = reversed(getattr(self.pm.hook, hook_name).get_hookimpls())
        return sorted(impls, key=lambda impl: impl.plugin_name != CORE_PLUGIN)  # stable

    def _ask(
        self, source: PluginInfo, stage: str, function: Callable[..., Any], /, **kwargs: Any
    ) -> tuple[bool, Any]:
        """Call a hook implementation or a registered object's method: the core's own directly
        (its errors are the user's: a corrupt file, a wrong ``--arch``), a plugin's guarded."""
        if source.plugin == CORE_PLUGIN:
            return True, function(**kwargs)
        return self._guarded(source, stage, function, **kwargs)

    def _answers(
        self,
        hook_name: str,
        args: dict[str, Any] | Callable[[PluginInfo], dict[str, Any]],
        *,
        refusals: bool = False,
        core_failure: Callable[[Exception], Exception] | None = None,
    ) -> Iterator[tuple[PluginInfo, Any]]:
        """``(source, result)`` for each implementation of a hook, in call order: the one loop
        over plugins.

        The core's implementation comes first, before any entry point is loaded (so adapting a
        PyTorch module loads no plugin); ``core_failure`` turns its non-``XaiError`` exceptions
        into the user's error. Each plugin's then runs in its own guard: one that raises is
        recorded in :attr:`failures` and skipped. ``args`` are the hook's arguments, or a function
        giving each plugin its own (a staging app, a ``register`` callback). With ``refusals``,
        an ``XaiError`` a plugin raises (it recognised the input and says why it cannot handle
        it) is yielded as its result.
        """
        for impl in self._impls_core_first(hook_name):
            source = self._source(impl.plugin_name)
            given = args(source) if callable(args) else args
            plugin = source.plugin != CORE_PLUGIN
            call = _returning_refusal(impl.function) if refusals and plugin else impl.function
            kwargs = {n: given[n] for n in impl.argnames}
            try:  # only the core's call can raise here: _ask guards the plugins'
                ok, result = self._ask(source, hook_name, call, **kwargs)
            except XaiError:
                raise
            except Exception as exc:
                if core_failure is None:
                    raise
                raise core_failure(exc) from exc
            if ok:
                yield source, result

    def _impls_core_first(self, hook_name: str) -> Iterator[Any]:
        """The core's implementations of a hook, then (entry points loaded only now) the
        plugins' in pluggy's call order."""
        with self._locked():
            core = [i for i in self._plugin_impls(hook_name) if i.plugin_name == CORE_PLUGIN]
        yield from core
        self.load()
        with self._locked():
            plugins = [i for i in self._plugin_impls(hook_name) if i.plugin_name != CORE_PLUGIN]
        yield from plugins

    # -- calling hooks -----------------------------------------------------------------------

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[PluginInfo, Any]]:
        """Call every plugin's implementation of a hook, each in its own guard, in pluggy's order.

        A plugin that raises is recorded in :attr:`failures` and skipped; the others still run.
        """
        return list(self._answers(hook_name, kwargs))

    def add_commands(self, app: typer.Typer) -> None:
        """Ask every plugin's ``register_commands`` for sub-commands and add them to ``app``.

        Each plugin gets a fresh Typer app of its own, so it cannot remove or change anything
        else. Its commands are then added one by one: a name ``app`` already has (a built-in
        command such as ``plugins``, or another plugin's) is refused and recorded as a failure.
        If the hook raises, none of its commands is added.
        """
        import typer  # as in _command_name

        self.load()
        taken = {_command_name(i) for i in (*app.registered_commands, *app.registered_groups)}
        staging: dict[str, typer.Typer] = {}

        def fresh_app(source: PluginInfo) -> dict[str, Any]:
            staging[source.plugin] = typer.Typer()
            return {"cli": staging[source.plugin]}

        for source, _ in self._answers("register_commands", fresh_app):
            app_of_plugin = staging[source.plugin]
            if app_of_plugin.registered_callback is not None:
                self._fail(
                    source,
                    "register_commands",
                    PluginError("a plugin cannot set the callback of `xai` itself; ignored."),
                )
            for info in (*app_of_plugin.registered_commands, *app_of_plugin.registered_groups):
                name = _command_name(info)
                if name is None or name in taken:
                    owner = self.commands.get(name or "")
                    by = _describe_source(owner) if owner else "xai-core itself"
                    self._fail(
                        source,
                        "register_commands",
                        PluginError(
                            f"the command `xai {name}` is already provided by {by}; this "
                            f"plugin's command of that name is refused. Rename it."
                            if name
                            else "a command without a name is refused."
                        ),
                    )
                    continue
                taken.add(name)
                self.commands[name] = source
                target = app.registered_groups if hasattr(info, "typer_instance") else None
                (target if target is not None else app.registered_commands).append(info)

    def _collect(
        self, hook_name: str, check: Callable[[Any], None], kind: str | None = None
    ) -> dict[str, list[_Entry]]:
        if hook_name in self._collecting:
            raise PluginError(
                f"a plugin looked up registered classes while {hook_name} was running; look "
                f"them up when your code runs, not while registering."
            )
        self._collecting.add(hook_name)
        try:
            found: dict[str, list[_Entry]] = {}
            staged: dict[str, list[_Entry]] = {}

            def register_for(source: PluginInfo) -> dict[str, Any]:
                mine = staged.setdefault(source.plugin, [])

                def register(cls: Any) -> None:
                    try:
                        check(cls)
                    except PluginError as exc:
                        self._fail(source, "register", exc)
                        return
                    mine.append(_Entry(cls, source))

                return {"register": register}

            # A plugin whose hook raises is not yielded: nothing it staged is kept (atomic).
            for source, _ in self._answers(hook_name, register_for):
                for entry in staged[source.plugin]:
                    found.setdefault(entry.cls.name, []).append(entry)
        finally:
            self._collecting.discard(hook_name)
        kind = kind or ("metric" if "metric" in hook_name else "method")
        return self._apply_precedence(found, kind)

    def _apply_precedence(
        self, found: dict[str, list[_Entry]], kind: str
    ) -> dict[str, list[_Entry]]:
        """A name a built-in registered stays the built-in's: third-party duplicates are refused.

        A name only third-party plugins (or several built-ins) registered twice stays a
        conflict: unusable, listed by ``xai plugins`` and skipped by ``compare()`` with why.
        """
        for name, entries in found.items():
            builtins = [e for e in entries if is_builtin(e.source)]
            if not builtins or len(builtins) == len(entries):
                continue
            owner = _describe_source(builtins[0].source)
            for entry in entries:
                if not is_builtin(entry.source):
                    self._fail(
                        entry.source,
                        "register",
                        PluginError(
                            f"the {kind} {name!r} is provided by the built-in {owner}; "
                            f"{_qualname(entry.cls)} of this plugin is refused. Rename it."
                        ),
                    )
            found[name] = builtins
        return found

    def _cached(
        self,
        attribute: str,
        hook_name: str,
        check: Callable[[Any], None],
        kind: str | None = None,
    ) -> Any:
        """A lookup table, collected once under the lock (never cached while loading)."""
        table = getattr(self, attribute)
        if table is not None:
            return table
        self.load()
        with self._locked():
            table = getattr(self, attribute)
            if table is None:
                table = self._collect(hook_name, check, kind)
                if not self._loading:  # a plugin's import asked: the table is not complete yet
                    setattr(self, attribute, table)
        return table

    # -- explainers --------------------------------------------------------------------------

    @property
    def _explainer_entries(self) -> dict[str, list[_Entry]]:
        return self._cached("_explainers", "register_explainers", _check_explainer_class)

    @staticmethod
    def _info(entry: _Entry) -> ExplainerInfo:
        return ExplainerInfo.from_class(entry.cls, entry.source)

    def conflicts(self) -> dict[str, list[PluginInfo]]:
        """Names registered by more than one plugin: unusable until one plugin is removed."""
        return {
            name: [e.source for e in entries]
            for name, entries in self._explainer_entries.items()
            if len(entries) > 1
        }

    def unusable_explainers(self) -> dict[str, str]:
        """Method names that cannot be used (registered twice), with the reason."""
        return {
            name: _conflict_reason("method", name, entries)
            for name, entries in self._explainer_entries.items()
            if len(entries) > 1
        }

    def get_explainer(self, name: str) -> ExplainerInfo:
        return self._info(_only_entry(self._explainer_entries, name, "method"))

    def list_explainers(
        self,
        *,
        scope: Scope | str | None = None,
        dependence: Dependence | str | None = None,
        requires: Iterable[Capability | str] | None = None,
        model: Any = None,
    ) -> list[ExplainerInfo]:
        """Usable explainers, sorted by name, filtered by tags and by what ``model`` can run."""
        infos = [self._info(e[0]) for e in self._explainer_entries.values() if len(e) == 1]
        if scope is not None:
            wanted_scope = Scope(scope)
            infos = [i for i in infos if i.tags.scope is wanted_scope]
        if dependence is not None:
            wanted_dependence = Dependence(dependence)
            infos = [i for i in infos if i.tags.dependence is wanted_dependence]
        if requires is not None:
            caps = {Capability(c) for c in requires}
            infos = [i for i in infos if caps <= i.tags.requires]
        if model is not None:
            adapter = self.adapt(model)
            infos = [i for i in infos if self.unsupported_reason(i, adapter) is None]
        return sorted(infos, key=lambda i: i.name)

    def unsupported_reason(self, info: ExplainerInfo, adapter: ModelAdapter) -> str | None:
        """Why ``info``'s method cannot run on ``adapter``, or ``None`` if it can."""
        missing = info.tags.requires - adapter.capabilities
        if missing:
            needs = ", ".join(sorted(c.value for c in missing))
            offers = ", ".join(sorted(c.value for c in adapter.capabilities))
            return f"{info.name} needs {needs}; this {adapter.kind} model offers only {offers}"
        gaps = protocol_gaps(adapter, info.tags.requires)
        if gaps:  # declared but not implemented: the method would fail on a missing method
            return f"{info.name} cannot run: {describe_gaps(adapter, gaps)}"
        check = getattr(info.cls, "unsupported_reason", None)
        if check is None:
            return None

        def ask() -> Any:
            try:
                return check(adapter)
            except XaiError as exc:  # the plugin's own way of saying why
                return str(exc)

        source = PluginInfo(info.plugin, info.distribution, info.version)
        ok, reason = self._guarded(source, "unsupported_reason", ask)
        if ok and (reason is None or isinstance(reason, str)):
            return reason
        if ok:  # a plugin bug must not make the method look runnable, nor break the listing
            self._fail(
                source,
                "unsupported_reason",
                PluginError(f"unsupported_reason() returned {reason!r}, not a str or None."),
            )
        return (
            f"{info.name} cannot tell whether it runs on this model: its unsupported_reason() "
            f"is broken (see `xai plugins`)"
        )

    # -- metrics -----------------------------------------------------------------------------

    @property
    def _metric_entries(self) -> dict[str, list[_Entry]]:
        return self._cached("_metrics", "register_metrics", check_metric_class)

    def metrics(self) -> dict[str, type]:
        """Usable metric classes by name (names registered twice are left out, see below)."""
        return {name: e[0].cls for name, e in self._metric_entries.items() if len(e) == 1}

    def unusable_metrics(self) -> dict[str, str]:
        """Metric names that cannot be used (registered twice), with the reason."""
        return {
            name: _conflict_reason("metric", name, entries)
            for name, entries in self._metric_entries.items()
            if len(entries) > 1
        }

    def get_metric(self, name: str) -> type:
        return _only_entry(self._metric_entries, name, "metric").cls

    def metric_source(self, name: str) -> PluginInfo:
        """The plugin that registered the metric ``name``."""
        return _only_entry(self._metric_entries, name, "metric").source

    # -- models ------------------------------------------------------------------------------

    def adapt(self, model: Any, **options: Any) -> ModelAdapter:
        """The adapter for ``model``: itself if it is one, the core's for a PyTorch module or an
        ONNX model, else the first plugin whose ``adapt_model`` returns a ``ModelAdapter``.

        Plugins are never asked for what the core adapts, so no plugin can take over or block
        PyTorch and ONNX models. A plugin that raises (other than an ``XaiError`` saying why it
        cannot use a model it recognised) or returns something else than an adapter is
        recorded as a failure and skipped; the next plugin is asked.
        """
        if isinstance(model, ModelAdapter):
            return model

        def broken(exc: Exception) -> Exception:  # the core's adapter broke: say so, not "type"
            return ModelError(
                f"xai-core's adapter failed on this {type(model).__name__}: "
                f"{type(exc).__name__}: {exc}. Please report it; meanwhile pass an "
                f"xai_core.ModelAdapter (e.g. TorchAdapter(model, input_spec=...))."
            )

        refusal: XaiError | None = None
        answers = self._answers(
            "adapt_model",
            {"model": model, "options": options},
            refusals=True,
            core_failure=broken,
        )
        for source, adapter in answers:
            if isinstance(adapter, XaiError):
                refusal = refusal or adapter
            elif adapter is not None and not isinstance(adapter, ModelAdapter):
                self._fail(
                    source,
                    "adapt_model",
                    PluginError(
                        f"adapt_model returned a {type(adapter).__name__}, not an "
                        f"xai_core.ModelAdapter (or None for models it does not handle)."
                    ),
                )
            elif adapter is not None:
                try:
                    check_protocols(adapter)
                except XaiError as exc:  # kept: what it implements still works; said once
                    self._fail(source, "adapt_model", exc)
                return adapter
        if refusal is not None:
            raise refusal
        raise ModelTypeError(
            f"xai-core cannot explain a {type(model).__module__}.{type(model).__name__}: pass a "
            f"torch.nn.Module, an ONNX model (path, bytes or onnxruntime.InferenceSession), or "
            f"install a plugin that adapts this kind of model."
        )

    # -- loading models from a spec (`xai explain SPEC`) -----------------------------------------

    def load_model(self, spec: str, **options: Any) -> tuple[Any, dict[str, Any]]:
        """``(model, info)`` for a command-line model ``spec``: the core's loaders first (they
        claim ``demo:`` specs and every existing path), then the plugins' ``load_model`` in
        pluggy's order; the first result wins.

        The core's errors (a corrupt file, a wrong ``--arch``) are the user's and propagate. A
        plugin that raises (other than an ``XaiError`` saying why it cannot load a spec it
        recognised) or returns something else than ``(model, dict)`` is recorded as a failure
        and skipped, like a raising ``adapt_model``.
        """
        refusal: XaiError | None = None
        answers = self._answers("load_model", {"spec": spec, "options": options}, refusals=True)
        for source, result in answers:
            if isinstance(result, XaiError):
                refusal = refusal or result
                continue
            if result is None:
                continue
            if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
                self._fail(
                    source,
                    "load_model",
                    PluginError(
                        f"load_model returned a {type(result).__name__}, not (model, info dict) "
                        f"(or None for specs it does not load)."
                    ),
                )
                continue
            model, info = result
            if source.plugin == CORE_PLUGIN:
                return model, info
            return model, {"kind": source.plugin, **info, "loader": source.distribution}
        if refusal is not None:
            raise refusal
        prefix = spec.split(":", 1)[0] if ":" in spec else None
        hint = (
            f" No installed plugin loads {prefix}: specs (see `xai plugins`)."
            if prefix and len(prefix) > 1
            else ""
        )
        raise ModelError(f"Model file not found: {spec}.{hint}")

    # -- input readers -----------------------------------------------------------------------

    def readers(self) -> list[tuple[str, Any, PluginInfo]]:
        """Usable readers ``(name, reader, source)``: the core's first, then the plugins' in
        pluggy's order. A name registered twice by third-party plugins is left out (listed by
        ``xai plugins`` as a conflict); a built-in reader's name cannot be taken over."""
        listed = self._reader_list
        if listed is not None:
            return listed
        table = self._cached("_readers", "register_readers", _check_reader, "reader")
        with self._locked():
            listed = [
                (name, _instance(e[0].cls), e[0].source)
                for name, e in table.items()
                if len(e) == 1
            ]
            if self._readers is not None:  # cache only a complete table (see _cached)
                self._reader_list = listed
        return listed

    def reader_for(self, path: Any) -> tuple[str, Any, PluginInfo] | None:
        """The first reader that claims ``path``, or ``None``.

        A plugin reader whose ``claims`` raises or returns a non-bool is recorded as a failure
        and treated as not claiming; the core's readers are asked without a guard (fast).
        """
        for name, reader, source in self.readers():
            ok, claimed = self._ask(source, "claims", lambda r=reader: r.claims(path))
            if ok and not isinstance(claimed, bool):
                self._fail(
                    source,
                    "claims",
                    PluginError(f"reader {name!r}: claims() returned {claimed!r}, not a bool."),
                )
            elif ok and claimed:
                return name, reader, source
        return None

    def get_reader(self, name: str) -> tuple[Any, PluginInfo]:
        """The reader registered as ``name`` and its plugin."""
        for found, reader, source in self.readers():
            if found == name:
                return reader, source
        table = self._cached("_readers", "register_readers", _check_reader, "reader")
        entry = _only_entry(table, name, "reader")  # unknown or conflicting: a typed error
        return _instance(entry.cls), entry.source  # pragma: no cover - _only_entry raised

    def read(self, kind: str, path: Any, options: Any, *, returns: type) -> Any:
        """Read ``path`` with the reader registered as ``kind``; an instance of ``returns``
        (:class:`xai_core.io.inputs.LoadedInput`, passed in by the io layer that defines it).

        A plugin reader's failure is the file's: an ``XaiError`` it raises propagates, any other
        exception (or a result that is not a ``returns``) becomes an ``InputFileError`` naming
        the file and the plugin, so a batch goes on with the next file.
        """

        reader, source = self.get_reader(kind)
        if source.plugin == CORE_PLUGIN:
            return reader.read(path, options)
        errors: list[Exception] = []

        def call() -> Any:
            try:
                return reader.read(path, options)
            except Exception as exc:  # the file's error, not the plugin's failure
                errors.append(exc)
                return None

        ok, loaded = self._guarded(source, "read", call)
        who = f"the {kind!r} reader of {_describe_source(source)}"
        if errors and isinstance(errors[0], XaiError):
            raise errors[0]
        if errors:
            raise InputFileError(path, f"{who} failed: {describe_exception(errors[0])}") from (
                errors[0]
            )
        if not ok:
            raise InputFileError(path, f"{who} failed (see `xai plugins`)")
        if not isinstance(loaded, returns):
            raise InputFileError(
                path, f"{who} returned a {type(loaded).__name__}, not a {returns.__name__}"
            )
        return loaded

    # -- executors ---------------------------------------------------------------------------

    def executor_names(self) -> list[str]:
        table = self._cached("_executors", "register_executors", _check_executor, "executor")
        return sorted(name for name, e in table.items() if len(e) == 1)

    def get_executor(self, name: str) -> Any:
        """A new instance of the executor ``name`` (``"local"`` is the core's)."""
        table = self._cached("_executors", "register_executors", _check_executor, "executor")
        return _instance(_only_entry(table, name, "executor").cls)

    # -- reporting ---------------------------------------------------------------------------

    def _extension_rows(self) -> list[dict[str, Any]]:
        """Rows for the plugins' model loaders, readers and executors (not the core's own)."""
        found: list[tuple[str, str, PluginInfo, str]] = []
        for impl in self._plugin_impls("load_model"):
            if impl.plugin_name != CORE_PLUGIN:
                source = self._source(impl.plugin_name)
                found.append((source.plugin, "loader", source, _summary(impl.function)))
        for name, _, source in self.readers():
            found.append((name, "reader", source, "for files the core's readers do not claim"))
        table = self._cached("_executors", "register_executors", _check_executor, "executor")
        for name, entries in table.items():
            if len(entries) == 1:
                found.append((name, "executor", entries[0].source, f"engine={name!r}"))
        return [
            _ok_row(name, kind, source, note=note)
            for name, kind, source, note in found
            if source.plugin != CORE_PLUGIN
        ]

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per explainer, metric, adapter, command, conflict and failure (``xai plugins``).

        ``origin`` says whether a row's plugin is built in (it wins name clashes) or third-party.
        """
        rows = [_with_origin(info.as_dict(), info) for info in self.list_explainers()]
        for name, entries in sorted(self._metric_entries.items()):
            cls, source = entries[0].cls, entries[0].source
            rows.append(
                {
                    "name": name,
                    "kind": "metric",
                    "scope": None,  # metrics have no scope or dependence; keys kept for tools
                    "dependence": None,
                    "better": cls.direction.value,
                    "requires": sorted(n.value for n in cls.needs),
                    "plugin": " + ".join(e.source.distribution or e.source.plugin for e in entries),
                    "version": source.version if len(entries) == 1 else None,
                    "status": "ok" if len(entries) == 1 else "conflict",
                    "origin": _origin(source) if len(entries) == 1 else None,
                    **(
                        {}
                        if len(entries) == 1
                        else {"error": _conflict_reason("metric", name, entries)}
                    ),
                }
            )
        for name, sources in self.conflicts().items():
            entry = self._explainer_entries[name][0]
            rows.append(
                {
                    "name": name,
                    "kind": "explainer",
                    **entry.cls.tags.as_dict(),
                    "plugin": " + ".join(s.distribution or s.plugin for s in sources),
                    "version": None,
                    "status": "conflict",
                    "error": f"registered by {' and '.join(_describe_source(s) for s in sources)}",
                }
            )
        for impl in self._plugin_impls("adapt_model"):
            if impl.plugin_name == CORE_PLUGIN:
                continue
            source = self._source(impl.plugin_name)
            summary = _summary(impl.function)
            note = f"{summary} {_ADAPTER_NOTE}" if summary else _ADAPTER_NOTE
            rows.append(_ok_row(source.plugin, "adapter", source, summary=summary, note=note))
        rows.extend(self._extension_rows())
        for name, source in sorted(self.commands.items()):
            rows.append(_ok_row(f"xai {name}", "command", source))
        rows.extend(f.as_dict() for f in list(self.failures))
        return rows


def _returning_refusal(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` returning, not raising, the ``XaiError`` by which a plugin says it
    recognised a model or spec but cannot handle it (shown if no other plugin can)."""

    def call(**kwargs: Any) -> Any:
        try:
            return function(**kwargs)
        except XaiError as exc:
            return exc

    return call


def _ok_row(name: str, kind: str, source: PluginInfo, **extra: Any) -> dict[str, Any]:
    """An ``xai plugins`` row of a working adapter, loader, reader, executor or command."""
    return {
        "name": name,
        "kind": kind,
        "scope": None,  # only explainers have a scope and a dependence; keys kept for tools
        "dependence": None,
        "plugin": source.distribution or source.plugin,
        "version": source.version,
        "status": "ok",
        "origin": _origin(source),
        **extra,
    }


def _summary(function: Any) -> str:
    """The first line of a hook implementation's docstring ("" without one)."""
    doc = (inspect.getdoc(function) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _source_of(ep: Any) -> PluginInfo:
    dist = ep.dist.name if ep.dist is not None else None
    version = ep.dist.version if ep.dist is not None else None
    return PluginInfo(ep.name, dist, version)


def _origin(source: PluginInfo) -> str:
    return "built-in" if is_builtin(source) else "third-party"


def _with_origin(row: dict[str, Any], info: ExplainerInfo) -> dict[str, Any]:
    return {**row, "origin": _origin(PluginInfo(info.plugin, info.distribution, info.version))}


def _conflict_reason(kind: str, name: str, entries: list[_Entry]) -> str:
    who = " and ".join(_describe_source(e.source) for e in entries)
    return (
        f"the {kind} {name!r} is registered by {who}; neither is used until one is uninstalled "
        f"or blocked with {ENV_BLOCK}"
    )


def _only_entry(found: dict[str, list[_Entry]], name: str, kind: str) -> _Entry:
    """The one registration of ``name``; a typed error when there is none or several."""
    entries = found.get(name)
    if not entries:
        available = sorted(found)
        raise UnknownMethodError(
            f"No installed plugin provides the {kind} {name!r}.{did_you_mean(name, available)} "
            f"Installed {kind}s: {', '.join(available) or 'none'} (see `xai plugins`)."
        )
    if len(entries) > 1:
        who = " and ".join(_describe_source(e.source) for e in entries)
        raise PluginConflictError(
            f"The {kind} {name!r} is registered by {who}; uninstall one of them, or block one "
            f"with {ENV_BLOCK}."
        )
    return entries[0]


def _describe_source(source: PluginInfo) -> str:
    if source.distribution:
        return f"{source.distribution} {source.version} (plugin {source.plugin!r})"
    return f"plugin {source.plugin!r}"


_registry: Registry | None = None
_registry_lock = threading.Lock()
_trace_handler: logging.Handler | None = None


def get_registry() -> Registry:
    """The process-wide registry, created on first use (once, also when threads race)."""
    global _registry, _trace_handler
    registry = _registry
    if registry is not None:
        return registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
            if os.environ.get(ENV_TRACE) and _trace_handler is None:
                _trace_handler = logging.StreamHandler(sys.stderr)
                _trace_handler.setFormatter(logging.Formatter("xai-core trace: %(message)s"))
                trace_log.addHandler(_trace_handler)
                trace_log.setLevel(logging.DEBUG)
        return _registry


def reset_registry() -> None:
    """Forget loaded plugins; the next call rescans entry points (after pip install/uninstall)."""
    global _registry
    with _registry_lock:
        _registry = None
