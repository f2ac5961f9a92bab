"""The registry: entry points, broken plugins, clashes, allow/block lists, tracing, lookups."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import xai_core
from xai_core import Registry, Tags
from xai_core.core.api import run_explainer
from xai_core.core.errors import (
    CapabilityError,
    ModelTypeError,
    PluginConflictError,
    UnknownMethodError,
)
from xai_core.core.registry import PluginWarning

from .conftest import build_copy, pip

XAI = str(Path(sys.executable).with_name("xai"))


def registry_with(site: Path, monkeypatch) -> Registry:
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return Registry()


def test_builtins_are_found_by_entry_point_like_any_plugin(fresh_registry):
    info = fresh_registry.get_explainer("gradcam")
    assert info.distribution == "xai-gradcam"
    assert info.plugin == "gradcam"
    assert info.version
    assert "layer" in info.options


def test_third_party_distribution_appears_runs_and_disappears(tmp_path, cnn, images):
    pip("install", "--no-deps", "--no-build-isolation", str(build_copy("xai-sobel", tmp_path)))
    try:
        importlib.invalidate_caches()
        xai_core.reset_registry()
        names = {i.name: i for i in xai_core.list_explainers()}
        assert names["sobel"].distribution == "xai-sobel"
        assert names["sobel"].version == "1.2.3"
        exp = xai_core.explain(cnn, images, method="sobel")
        assert exp.maps.shape == (2, 16, 16)
        assert exp.plugin == "xai-sobel"
        listed = subprocess.run(
            [XAI, "plugins", "--json"], capture_output=True, text=True, check=True
        )
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows["sobel"]["plugin"] == "xai-sobel" and rows["sobel"]["status"] == "ok"
    finally:
        pip("uninstall", "-y", "xai-sobel")
        importlib.invalidate_caches()
        xai_core.reset_registry()
    assert "sobel" not in {i.name for i in xai_core.list_explainers()}
    with pytest.raises(UnknownMethodError, match="sobel"):
        xai_core.explain(cnn, images, method="sobel")


def test_broken_plugins_are_reported_and_the_rest_still_works(
    plugin_site, monkeypatch, cnn, images
):
    with pytest.warns(PluginWarning):
        registry = registry_with(plugin_site, monkeypatch)
        names = {i.name for i in registry.list_explainers()}
    failures = {f.plugin: f for f in registry.failures}
    assert failures["broken_import"].stage == "import"
    assert failures["broken_import"].distribution == "xai-broken-import"
    assert failures["broken_import"].version == "0.0.1"
    assert "ModuleNotFoundError" in failures["broken_import"].error
    assert failures["broken_hook"].stage == "register_explainers"
    assert "crashed" in failures["broken_hook"].error
    # Registration is atomic: what the crashing hook registered before raising is dropped.
    assert "half_registered" not in names
    assert "gradcam" in names
    exp = run_explainer(registry.get_explainer("gradcam"), registry.adapt(cnn), images, None, {})
    assert exp.maps.shape == (2, 16, 16)


def test_name_clash_names_both_distributions(plugin_site, monkeypatch):
    with pytest.warns(PluginWarning):
        registry = registry_with(plugin_site, monkeypatch)
        with pytest.raises(PluginConflictError) as err:
            registry.get_explainer("sobel")
    assert "xai-sobel" in str(err.value) and "xai-clash" in str(err.value)
    assert "sobel" not in {i.name for i in registry.list_explainers()}
    required = {"name", "scope", "dependence", "plugin", "version", "status"}
    assert all(required <= set(row) for row in registry.plugin_rows())
    assert all("error" in row for row in registry.plugin_rows() if row["status"] != "ok")
    rows = {(r["name"], r["status"]) for r in registry.plugin_rows()}
    assert ("sobel", "conflict") in rows
    assert ("broken_import", "error") in rows


def test_block_list_removes_a_plugin(plugin_site, monkeypatch):
    monkeypatch.setenv("XAI_CORE_BLOCK_PLUGINS", "clash, xai-broken-import,broken_hook")
    registry = registry_with(plugin_site, monkeypatch)
    assert registry.get_explainer("sobel").distribution == "xai-sobel"
    assert registry.failures == []
    assert set(registry.skipped) == {"clash", "broken_import", "broken_hook"}


def test_allow_list_loads_only_named_plugins(plugin_site, monkeypatch):
    monkeypatch.setenv("XAI_CORE_PLUGINS", "xai-sobel")
    registry = registry_with(plugin_site, monkeypatch)
    assert [i.name for i in registry.list_explainers()] == ["sobel"]


def test_trace_logs_every_hook_call(plugin_site):
    env = {
        **os.environ,
        "XAI_CORE_TRACE": "1",
        "XAI_CORE_BLOCK_PLUGINS": "broken_import,broken_hook",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_site), env.get("PYTHONPATH", "")])
    done = subprocess.run([XAI, "plugins", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "hook register_explainers -> gradcam" in done.stderr
    assert "hook register_explainers -> sobel" in done.stderr
    rows = json.loads(done.stdout)
    assert any(r["name"] == "sobel" and r["status"] == "conflict" for r in rows)


class _Constant:
    """A model-agnostic test explainer: a constant map."""

    name = "constant"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets, *, value: float = 1.0):
        scores = model.forward(inputs)
        k = targets.resolve(scores).count
        return xai_core.Attribution(
            maps=torch.full((inputs.shape[0], k, *inputs.shape[2:]), value), scores=scores
        )


class _ConstantPlugin:
    @xai_core.hookimpl
    def register_explainers(self, register):
        register(_Constant)


def test_in_process_plugin_and_filters(fresh_registry, cnn):
    fresh_registry.register_plugin(_ConstantPlugin(), "constant-plugin")
    agnostic = {i.name for i in xai_core.list_explainers(dependence="model-agnostic")}
    assert "constant" in agnostic and "gradcam" not in agnostic
    specific = {i.name for i in xai_core.list_explainers(requires=["gradients"])}
    assert "gradcam" in specific and "constant" not in specific
    global_ones = xai_core.list_explainers(scope="global")
    assert all(i.scope == "global" for i in global_ones)
    assert not {"constant", "gradcam"} & {i.name for i in global_ones}
    assert "constant" in {i.name for i in xai_core.list_explainers(model=cnn)}
    with pytest.raises(ValueError):
        xai_core.list_explainers(scope="globl")


def test_invalid_classes_are_refused_one_by_one(fresh_registry):
    class NoTags:
        name = "no_tags"

        def explain(self, model, inputs, targets):
            pass

    class BadName(_Constant):
        name = "Bad Name!"

    class Plugin:
        @xai_core.hookimpl
        def register_explainers(self, register):
            register(NoTags)
            register(BadName)
            register(_Constant)

    with pytest.warns(PluginWarning):
        fresh_registry.register_plugin(Plugin(), "mixed")
        names = {i.name for i in fresh_registry.list_explainers()}
    assert "constant" in names and "no_tags" not in names
    errors = " ".join(f.error for f in fresh_registry.failures)
    assert "tags" in errors and "Bad Name!" in errors


def test_unknown_method_suggests_close_names(fresh_registry, cnn, images):
    # the closest name first (the CAM family adds 'xgradcam' after it)
    with pytest.raises(UnknownMethodError, match=r"Did you mean 'gradcam'(, '[a-z-]+')*\?"):
        xai_core.explain(cnn, images, method="gradcamm")


def test_method_the_model_cannot_run_names_capability_and_alternatives(fresh_registry, images):
    fresh_registry.register_plugin(_ConstantPlugin(), "constant-plugin")

    class ScoresOnly(xai_core.ModelAdapter):
        kind = "black-box"

        def forward(self, inputs):
            return inputs.mean(dim=(2, 3))

    with pytest.raises(CapabilityError) as err:
        xai_core.explain(ScoresOnly(), images, method="gradcam")
    message = str(err.value)
    assert "gradients" in message and "layers" in message and "constant" in message


def test_unknown_model_type_is_a_typed_error(fresh_registry, images):
    with pytest.raises(ModelTypeError, match=r"cannot explain a builtins\.dict"):
        xai_core.explain({}, images, method="gradcam")


def _slow_entry_points(monkeypatch):
    """Widen the race: scanning entry points takes 50 ms, as on a large environment."""
    import xai_core.core.registry as module

    real = module.entry_points

    def slow(**kwargs):
        time.sleep(0.05)
        return real(**kwargs)

    monkeypatch.setattr(module, "entry_points", slow)


def _race(count: int, work) -> list:
    """Run ``work`` in ``count`` threads released at once; return results or exceptions."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_first_lookups_from_many_threads_all_succeed(monkeypatch):
    _slow_entry_points(monkeypatch)
    registry = Registry()
    results = _race(8, lambda: registry.get_explainer("gradcam").name)
    assert results == ["gradcam"] * 8
    assert registry.get_metric("deletion").name == "deletion"  # nothing half-loaded was cached


def test_get_registry_creates_one_registry_for_racing_threads(monkeypatch):
    import xai_core.core.registry as module

    real_init = module.Registry.__init__

    def slow_init(self, *args, **kwargs):
        time.sleep(0.02)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(module.Registry, "__init__", slow_init)
    xai_core.reset_registry()
    try:
        registries = _race(8, xai_core.get_registry)
    finally:
        xai_core.reset_registry()
    assert all(r is registries[0] for r in registries)
