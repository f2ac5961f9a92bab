"""Plugin precedence (docs/architecture.md): built-in names and commands cannot be taken over, the
core adapts PyTorch and ONNX models itself, and nothing is dropped without a word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import xai_core
from xai_core import Registry, Tags
from xai_core.core.errors import ModelError, ModelTypeError
from xai_core.core.metrics import Direction, MetricResult
from xai_core.core.registry import BUILTIN_DISTRIBUTIONS, PluginWarning
from xai_core.torch.adapter import TorchAdapter

XAI = str(Path(sys.executable).with_name("xai"))
ROOT = Path(__file__).parents[1]


def test_builtin_distributions_are_the_plugins_folder():
    names = {
        tomllib.loads(p.read_text())["project"]["name"]
        for p in (ROOT / "plugins").glob("*/pyproject.toml")
    }
    assert names == BUILTIN_DISTRIBUTIONS


def test_a_third_party_plugin_cannot_take_a_builtin_name(hostile_site, site_registry, cnn, images):
    with pytest.warns(PluginWarning, match="refused"):
        registry = site_registry(hostile_site, block="xai-hostile")
        assert registry.get_explainer("gradcam").distribution == "xai-gradcam"
        assert registry.metric_source("deletion").distribution == "xai-metrics"
    refused = [f for f in registry.failures if f.distribution == "xai-impostor"]
    assert {f.stage for f in refused} == {"register"}
    assert any("method 'gradcam'" in f.error and "FakeGradcam" in f.error for f in refused)
    assert any("metric 'deletion'" in f.error for f in refused)
    # Grad-CAM is the built-in one, and compare() keeps it among its default methods.
    exp = xai_core.explain(cnn, images, method="gradcam")
    assert exp.plugin == "xai-gradcam" and exp.model["kind"] != "greedy"
    result = xai_core.compare(cnn, images, metrics=[])
    assert "gradcam" in result.methods
    rows = {(r["name"], r["kind"]): r for r in registry.plugin_rows()}
    assert rows[("gradcam", "explainer")]["origin"] == "built-in"
    assert rows[("deletion", "metric")]["status"] == "ok"


def test_compare_lists_a_clashing_third_party_method_as_skipped(
    plugin_site, site_registry, cnn, images
):
    site_registry(plugin_site, block="broken_import,broken_hook")
    result = xai_core.compare(cnn, images, metrics=[])
    assert "sobel" not in result.methods
    reason = result.skipped_methods["sobel"]
    assert "xai-sobel" in reason and "xai-clash" in reason


def test_compare_lists_a_clashing_metric_as_skipped(monkeypatch, cnn, images):
    class Area:
        name = "area"
        direction = Direction.HIGHER
        needs = frozenset()

        def compute(self, context):
            return MetricResult(context.maps.flatten(1).mean(1))

    class Flat:
        name = "flat"
        tags = Tags("local", "model-agnostic")

        def explain(self, model, inputs, targets):
            scores = model.forward(inputs).detach()
            k = targets.resolve(scores).count
            return xai_core.Attribution(torch.ones(inputs.shape[0], k, 4, 4), scores)

    class One:
        @xai_core.hookimpl
        def register_metrics(self, register):
            register(Area)

        @xai_core.hookimpl
        def register_explainers(self, register):
            register(Flat)

    class Two:
        @xai_core.hookimpl
        def register_metrics(self, register):
            register(Area)

    registry = Registry(entry_points_group=None)
    registry.register_plugin(One(), "one", distribution="xai-one", version="1")
    registry.register_plugin(Two(), "two", distribution="xai-two", version="2")
    monkeypatch.setattr("xai_core.workflows.compare.get_registry", lambda: registry)
    result = xai_core.compare(cnn, images)
    assert result.methods == ["flat"] and result.metrics == []
    assert "xai-one" in result.skipped_metrics["area"]
    assert "xai-two" in result.skipped_metrics["area"]


def test_builtin_commands_cannot_be_replaced(hostile_site):
    env = {**os.environ, "XAI_CORE_BLOCK_PLUGINS": "xai-hostile"}
    env["PYTHONPATH"] = os.pathsep.join([str(hostile_site), env.get("PYTHONPATH", "")])
    listed = subprocess.run([XAI, "plugins", "--json"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)  # the built-in `xai plugins` ran, not the impostor's
    refused = [r for r in rows if r["status"] == "error" and r["stage"] == "register_commands"]
    assert len(refused) == 1 and "`xai plugins`" in refused[0]["error"]
    assert refused[0]["plugin"] == "xai-impostor"
    commands = {r["name"]: r for r in rows if r["kind"] == "command"}
    assert commands["xai impostor-hello"]["plugin"] == "xai-impostor"
    adapters = {r["name"]: r for r in rows if r["kind"] == "adapter"}
    assert adapters["greedy_adapter"]["summary"] == "Adapts anything at all."
    assert "neither torch.nn.Module nor ONNX" in adapters["greedy_adapter"]["note"]


def test_plugin_commands_are_added_atomically_and_without_clashes():
    import typer
    from typer.testing import CliRunner

    class First:
        @xai_core.hookimpl
        def register_commands(self, cli):
            cli.command("hello")(lambda: None)

    class Second:
        @xai_core.hookimpl
        def register_commands(self, cli):
            cli.command("hello")(lambda: None)  # taken by the first plugin

            @cli.command("bye")
            def bye() -> None:
                typer.echo("bye from the second plugin")

    class Crashing:
        @xai_core.hookimpl
        def register_commands(self, cli):
            cli.command("half")(lambda: None)
            raise RuntimeError("crashed after adding a command")

    registry = Registry(entry_points_group=None)
    # pluggy asks the last registered first: here "first", then "second", then "crashing".
    for plugin, name in ((Crashing(), "crashing"), (Second(), "second"), (First(), "first")):
        registry.register_plugin(plugin, name)
    app = typer.Typer()
    app.command("plugins")(lambda: None)
    with pytest.warns(PluginWarning):
        registry.add_commands(app)
    assert "bye from the second plugin" in CliRunner().invoke(app, ["bye"]).output
    names = [c.name for c in app.registered_commands]
    assert sorted(names) == ["bye", "hello", "plugins"]
    owners = {n: s.plugin for n, s in registry.commands.items()}
    assert owners == {"hello": "first", "bye": "second"}
    errors = {f.plugin: f.error for f in registry.failures}
    assert "already provided by plugin 'first'" in errors["second"]
    assert "crashed" in errors["crashing"]


class BlackBox:
    """A model from another framework."""


class BlackBoxAdapter(xai_core.ModelAdapter):
    kind = "black-box"

    def forward(self, inputs):
        return inputs.mean(dim=(2, 3))


def _registry_with(*plugins) -> Registry:
    registry = Registry(entry_points_group=None)
    for i, plugin in enumerate(plugins):
        registry.register_plugin(plugin, f"adapter{i}")
    return registry


class _Accepts:
    @xai_core.hookimpl
    def adapt_model(self, model):
        """Black boxes."""
        return BlackBoxAdapter() if isinstance(model, BlackBox) else None


def test_a_plugin_adapter_cannot_take_over_pytorch_models(cnn):
    class Greedy:
        @xai_core.hookimpl
        def adapt_model(self, model):
            return BlackBoxAdapter()

    registry = _registry_with(Greedy())
    assert isinstance(registry.adapt(cnn), TorchAdapter)
    assert isinstance(registry.adapt(BlackBox()), BlackBoxAdapter)
    row = next(r for r in registry.plugin_rows() if r["kind"] == "adapter")
    assert row["name"] == "adapter0" and "neither torch.nn.Module nor ONNX" in row["note"]


def test_a_raising_adapter_blocks_nothing(cnn):
    class Raising:
        @xai_core.hookimpl
        def adapt_model(self, model):
            raise RuntimeError("adapter bug")

    class Refusing:
        @xai_core.hookimpl
        def adapt_model(self, model):
            raise ModelError("this plugin recognised the model but cannot use it")

    registry = _registry_with(_Accepts(), Raising(), Refusing())
    assert isinstance(registry.adapt(cnn), TorchAdapter)  # plugins are not even asked
    assert registry.failures == []
    with pytest.warns(PluginWarning, match="adapter bug"):
        assert isinstance(registry.adapt(BlackBox()), BlackBoxAdapter)
    assert [f.stage for f in registry.failures] == ["adapt_model"]
    # Nobody accepts a dict: the refusing plugin's reason is the most useful error.
    with pytest.raises(ModelError, match="recognised the model"):
        registry.adapt({})


def test_an_adapter_must_return_a_model_adapter():
    class Bogus:
        @xai_core.hookimpl
        def adapt_model(self, model):
            return "an adapter, honestly"

    registry = _registry_with(_Accepts(), Bogus())
    with pytest.warns(PluginWarning, match="not an xai_core.ModelAdapter"):
        assert isinstance(registry.adapt(BlackBox()), BlackBoxAdapter)
    with pytest.raises(ModelTypeError):
        registry.adapt(object())
