"""Every hook spec has a test here (test_hook_<name>) and is documented for plugin authors."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import xai_core
from xai_core import Tags, hookspecs
from xai_core.metrics import Direction, MetricResult
from xai_core.registry import PluginWarning

DOCS = Path(__file__).parents[1] / "docs"
HOOKS = sorted(
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "xai_core_spec")
)


def test_every_hook_has_a_test_and_documentation():
    assert HOOKS == ["adapt_model", "register_commands", "register_explainers", "register_metrics"]
    module = sys.modules[__name__]
    guide = (DOCS / "writing-a-plugin.md").read_text()
    for name in HOOKS:
        assert hasattr(module, f"test_hook_{name}"), f"hook {name} has no test"
        assert f"`{name}(" in guide, f"hook {name} is not documented in docs/writing-a-plugin.md"


def test_hook_register_explainers(fresh_registry, cnn, images):
    class Ones:
        name = "ones"
        tags = Tags("local", "model-agnostic")

        def explain(self, model, inputs, targets):
            scores = model.forward(inputs)
            k = targets.resolve(scores).count
            return xai_core.Attribution(torch.ones(inputs.shape[0], k, *inputs.shape[2:]), scores)

    class Plugin:
        @xai_core.hookimpl
        def register_explainers(self, register):
            register(Ones)

    fresh_registry.register_plugin(Plugin(), "ones-plugin", distribution="ones-dist", version="9")
    info = fresh_registry.get_explainer("ones")
    assert (info.plugin, info.distribution, info.version) == ("ones-plugin", "ones-dist", "9")
    assert xai_core.explain(cnn, images, method="ones").maps.sum() == images[:, 0].numel()


def test_hook_register_metrics(fresh_registry):
    class Area:
        name = "area"
        direction = Direction.HIGHER
        needs = frozenset()

        def compute(self, context):
            return MetricResult(context.maps.flatten(1).gt(0).float().mean(1))

    class Plugin:
        @xai_core.hookimpl
        def register_metrics(self, register):
            register(Area)

    fresh_registry.register_plugin(Plugin(), "metrics-plugin")
    assert fresh_registry.metrics()["area"] is Area


def test_hook_register_commands(fresh_registry):
    class Plugin:
        @xai_core.hookimpl
        def register_commands(self, cli: typer.Typer):
            @cli.command("hello")
            def hello(name: str = "world") -> None:
                """Say hello."""
                typer.echo(f"hello {name}")

    class Broken:
        @xai_core.hookimpl
        def register_commands(self, cli):
            raise RuntimeError("broken command plugin")

    fresh_registry.register_plugin(Plugin(), "hello-plugin")
    with pytest.warns(PluginWarning):
        fresh_registry.register_plugin(Broken(), "broken-cli")
        app = typer.Typer()
        app.command("plugins")(lambda: None)
        fresh_registry.call_each("register_commands", cli=app)
    result = CliRunner().invoke(app, ["hello", "--name", "xai"])
    assert result.exit_code == 0 and "hello xai" in result.output
    assert any(f.stage == "register_commands" for f in fresh_registry.failures)


def test_hook_adapt_model(fresh_registry, images):
    class BlackBox:
        """A model from another framework: a plain function from arrays to scores."""

        def __call__(self, array):
            return array.mean(axis=(2, 3))

    class BlackBoxAdapter(xai_core.ModelAdapter):
        kind = "black-box"

        def __init__(self, fn):
            self.fn = fn

        def forward(self, inputs):
            return torch.as_tensor(self.fn(inputs.numpy()))

    class Plugin:
        @xai_core.hookimpl
        def adapt_model(self, model):  # fewer arguments than the spec: allowed
            return BlackBoxAdapter(model) if isinstance(model, BlackBox) else None

    class Crashing:
        @xai_core.hookimpl
        def adapt_model(self, model, options):
            raise RuntimeError("adapter plugin bug")

    fresh_registry.register_plugin(Plugin(), "blackbox-plugin")
    with pytest.warns(PluginWarning):
        fresh_registry.register_plugin(Crashing(), "crashing-adapter")
        adapter = xai_core.adapt(BlackBox())
    assert isinstance(adapter, BlackBoxAdapter)
    assert any(f.stage == "adapt_model" for f in fresh_registry.failures)
    assert "gradcam" not in {i.name for i in xai_core.list_explainers(model=adapter)}


def test_plugin_tutorial_shows_the_tested_plugin_verbatim():
    """docs/writing-a-plugin.md must not drift from the plugin the tests install."""
    import re

    guide = (DOCS / "writing-a-plugin.md").read_text()
    blocks = re.findall(r"^`(xai-sobel/[^`]+)`:\n\n```\w*\n(.*?)^```", guide, re.S | re.M)
    assert {path for path, _ in blocks} == {
        "xai-sobel/pyproject.toml",
        "xai-sobel/xai_sobel/__init__.py",
    }
    data = Path(__file__).parent / "data"
    for path, body in blocks:
        assert body == (data / path).read_text(), f"{path} differs from the tutorial"
