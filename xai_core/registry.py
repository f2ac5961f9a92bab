"""Finding plugins, guarding against broken ones, and looking up what they registered.

Plugins are found through the ``xai_core`` entry-point group, the built-in explainers exactly
like a third-party plugin. Unlike pluggy's ``load_setuptools_entrypoints`` each entry point is
loaded on its own: a plugin that fails to import or whose hook raises is recorded as a
:class:`PluginFailure` (name, distribution, version, error), a warning is issued, and every other
plugin keeps working. A hook's registrations count only if the hook returns normally.

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
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from xai_core import hookspecs
from xai_core.adapters.base import ModelAdapter
from xai_core.errors import (
    ModelError,
    ModelTypeError,
    PluginConflictError,
    PluginError,
    UnknownMethodError,
    XaiError,
    did_you_mean,
)
from xai_core.hookspecs import PROJECT
from xai_core.metrics import check_metric_class
from xai_core.tags import Capability, Dependence, Scope, Tags
from xai_core.types import ExplainerInfo, PluginInfo

ENV_ALLOW = "XAI_CORE_PLUGINS"
ENV_BLOCK = "XAI_CORE_BLOCK_PLUGINS"
ENV_TRACE = "XAI_CORE_TRACE"

trace_log = logging.getLogger("xai_core.hooks")
_NAME = re.compile(r"^[a-z][a-z0-9_\-.]*$")


class PluginWarning(UserWarning):
    """A plugin was skipped because it is broken; see ``xai plugins`` for details."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin, or one class it registered, that could not be used."""

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


@dataclass
class _Entry:
    cls: type
    source: PluginInfo


def explainer_options(cls: type) -> dict[str, inspect.Parameter]:
    """The options an explainer accepts: the keyword-only parameters of its ``explain``."""
    params = inspect.signature(cls.explain).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_explainer_class(cls: Any) -> None:
    """Raise PluginError when ``cls`` breaks the Explainer protocol (said in words)."""
    if not isinstance(cls, type):
        raise PluginError(f"register() takes an explainer class; got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(
            f"{cls.__qualname__}.name must be a lower-case identifier such as 'gradcam'; "
            f"got {name!r}."
        )
    if not isinstance(getattr(cls, "tags", None), Tags):
        raise PluginError(f"{cls.__qualname__}.tags must be an xai_core.Tags instance.")
    if not callable(getattr(cls, "explain", None)):
        raise PluginError(f"{cls.__qualname__} has no explain() method.")
    params = [
        p
        for p in inspect.signature(cls.explain).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < 4:  # self, model, inputs, targets
        raise PluginError(
            f"{cls.__qualname__}.explain must accept (self, model, inputs, targets, *, options...)."
        )


def _names_from_env(var: str) -> set[str]:
    return {n.strip() for n in os.environ.get(var, "").split(",") if n.strip()}


class _BuiltinAdapters:
    """The core's own ``adapt_model``: PyTorch modules and ONNX models, asked last."""

    @hookspecs.hookimpl(trylast=True)
    def adapt_model(self, model: Any, options: dict[str, Any]) -> ModelAdapter | None:
        from torch import nn

        from xai_core.adapters.onnx import OnnxAdapter, is_onnx_model
        from xai_core.adapters.torch import TorchAdapter

        if isinstance(model, nn.Module):
            return TorchAdapter(model, input_spec=options.get("input_spec"))
        if is_onnx_model(model):
            return OnnxAdapter(model, providers=options.get("providers"))
        return None


class Registry:
    """Plugins, what they registered, and what failed. Loads entry points lazily, once."""

    def __init__(self, *, entry_points_group: str | None = PROJECT) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(_BuiltinAdapters(), name="xai_core.builtin")
        self.group = entry_points_group
        self.failures: list[PluginFailure] = []
        self.skipped: list[str] = []  # plugins not loaded because of the env allow/block lists
        self._sources: dict[str, PluginInfo] = {
            "xai_core.builtin": PluginInfo("xai_core", None, None)
        }
        self._explainers: dict[str, list[_Entry]] | None = None
        self._metrics: dict[str, list[_Entry]] | None = None
        self._loaded = False

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load every allowed entry point of the group, each in its own guard (idempotent)."""
        if self._loaded:
            return
        self._loaded = True
        if self.group is None:
            return
        allow, block = _names_from_env(ENV_ALLOW), _names_from_env(ENV_BLOCK)
        for ep in sorted(entry_points(group=self.group), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            names = {ep.name, dist}
            if (allow and not names & allow) or names & block:
                self.skipped.append(ep.name)
                continue
            if self.pm.has_plugin(ep.name):
                other = self._sources.get(ep.name)
                self._fail(
                    PluginInfo(ep.name, dist, version),
                    "import",
                    PluginError(
                        f"entry point {ep.name!r} is declared by both "
                        f"{other.distribution if other else '?'} and {dist}; uninstall one."
                    ),
                )
                continue
            source = PluginInfo(ep.name, dist, version)
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must never break the registry
                self._fail(source, "import", exc)
                continue
            self._register(obj, source)

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
        self._register(plugin, PluginInfo(name, distribution, version))
        self._invalidate()
        return name

    def unregister_plugin(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._sources.pop(name, None)
        self.failures = [f for f in self.failures if f.plugin != name]
        self._invalidate()

    def _register(self, obj: object, source: PluginInfo) -> None:
        try:
            self.pm.register(obj, name=source.plugin)
        except Exception as exc:  # pluggy validates hook signatures here
            self._fail(source, "register", exc)
            return
        self._sources[source.plugin] = source

    def _fail(self, source: PluginInfo, stage: str, exc: BaseException) -> None:
        failure = PluginFailure(
            source.plugin,
            source.distribution,
            source.version,
            stage,
            f"{type(exc).__name__}: {exc}",
            exc,
        )
        self.failures.append(failure)
        where = (
            f"{source.plugin} ({source.distribution} {source.version})"
            if source.distribution
            else source.plugin
        )
        warnings.warn(
            f"xai-core skipped plugin {where} at {stage}: {failure.error}",
            PluginWarning,
            stacklevel=3,
        )

    def _invalidate(self) -> None:
        self._explainers = None
        self._metrics = None

    # -- calling hooks -----------------------------------------------------------------------

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[PluginInfo, Any]]:
        """Call every plugin's implementation of a hook, each in its own guard, in pluggy's order.

        A plugin that raises is recorded in :attr:`failures` and skipped; the others still run.
        """
        self.load()
        results = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            source = self._sources.get(impl.plugin_name, PluginInfo(impl.plugin_name, None, None))
            args = {name: kwargs[name] for name in impl.argnames}
            start = time.perf_counter()
            try:
                result = impl.function(**args)
            except Exception as exc:
                self._fail(source, hook_name, exc)
                continue
            finally:
                trace_log.debug(
                    "hook %s -> %s (%.1f ms)",
                    hook_name,
                    impl.plugin_name,
                    1e3 * (time.perf_counter() - start),
                )
            results.append((source, result))
        return results

    def _collect(self, hook_name: str, check: Callable[[Any], None]) -> dict[str, list[_Entry]]:
        self.load()
        found: dict[str, list[_Entry]] = {}
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            source = self._sources.get(impl.plugin_name, PluginInfo(impl.plugin_name, None, None))
            staged: list[_Entry] = []

            def register(
                cls: Any, _staged: list[_Entry] = staged, _source: PluginInfo = source
            ) -> None:
                try:
                    check(cls)
                except PluginError as exc:
                    self._fail(_source, "register", exc)
                    return
                _staged.append(_Entry(cls, _source))

            start = time.perf_counter()
            try:
                impl.function(**{name: register for name in impl.argnames})
            except Exception as exc:  # nothing this plugin staged is kept: registration is atomic
                self._fail(source, hook_name, exc)
                continue
            finally:
                trace_log.debug(
                    "hook %s -> %s (%.1f ms)",
                    hook_name,
                    impl.plugin_name,
                    1e3 * (time.perf_counter() - start),
                )
            for entry in staged:
                found.setdefault(entry.cls.name, []).append(entry)
        return found

    # -- explainers --------------------------------------------------------------------------

    @property
    def _explainer_entries(self) -> dict[str, list[_Entry]]:
        if self._explainers is None:
            self._explainers = self._collect("register_explainers", _check_explainer_class)
        return self._explainers

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
        check = getattr(info.cls, "unsupported_reason", None)
        if check is not None:
            try:
                return check(adapter)
            except XaiError as exc:
                return str(exc)
        return None

    # -- metrics -----------------------------------------------------------------------------

    @property
    def _metric_entries(self) -> dict[str, list[_Entry]]:
        if self._metrics is None:
            self._metrics = self._collect("register_metrics", check_metric_class)
        return self._metrics

    def metrics(self) -> dict[str, type]:
        """Usable metric classes by name (names registered twice are left out, see below)."""
        return {name: e[0].cls for name, e in self._metric_entries.items() if len(e) == 1}

    def get_metric(self, name: str) -> type:
        return _only_entry(self._metric_entries, name, "metric").cls

    # -- models ------------------------------------------------------------------------------

    def adapt(self, model: Any, **options: Any) -> ModelAdapter:
        """The adapter for ``model``: itself if it is one, else the first plugin that accepts it."""
        if isinstance(model, ModelAdapter):
            return model
        self.load()
        crashed: list[tuple[str, Exception]] = []
        for impl in reversed(self.pm.hook.adapt_model.get_hookimpls()):
            args = {"model": model, "options": options}
            try:
                adapter = impl.function(**{n: args[n] for n in impl.argnames})
            except XaiError:
                raise  # a plugin that recognised the model and says why it cannot use it
            except Exception as exc:
                source = self._sources.get(
                    impl.plugin_name, PluginInfo(impl.plugin_name, None, None)
                )
                self._fail(source, "adapt_model", exc)
                crashed.append((impl.plugin_name, exc))
                continue
            if adapter is not None:
                return adapter
        if crashed:  # an adapter took the model up and broke: say so, not "wrong type"
            name, exc = crashed[-1]
            raise ModelError(
                f"The model adapter {name!r} failed on this {type(model).__name__}: "
                f"{type(exc).__name__}: {exc}. Please report it; meanwhile pass an "
                f"xai_core.ModelAdapter (e.g. TorchAdapter(model, input_spec=...))."
            ) from exc
        raise ModelTypeError(
            f"xai-core cannot explain a {type(model).__module__}.{type(model).__name__}: pass a "
            f"torch.nn.Module, an ONNX model (path, bytes or onnxruntime.InferenceSession), or "
            f"install a plugin that adapts this kind of model."
        )

    # -- reporting ---------------------------------------------------------------------------

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per explainer, metric, conflict and failure, for ``xai plugins``."""
        rows = [info.as_dict() for info in self.list_explainers()]
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
        rows.extend(f.as_dict() for f in self.failures)
        return rows


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


def get_registry() -> Registry:
    """The process-wide registry, created on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
        if os.environ.get(ENV_TRACE):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("xai-core trace: %(message)s"))
            trace_log.addHandler(handler)
            trace_log.setLevel(logging.DEBUG)
    return _registry


def reset_registry() -> None:
    """Forget loaded plugins; the next call rescans entry points (after pip install/uninstall)."""
    global _registry
    _registry = None
