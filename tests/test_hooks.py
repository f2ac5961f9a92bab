"""Every hook spec has a test here (test_hook_<name>) and is documented for plugin authors."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import xai_core
from xai_core import Tags
from xai_core.core import hookspecs
from xai_core.core.metrics import Direction, MetricResult
from xai_core.core.registry import PluginWarning

DOCS = Path(__file__).parents[1] / "docs"
HOOKS = sorted(
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "xai_core_spec")
)


def test_every_hook_has_a_test_and_documentation():
    assert HOOKS == [
        "adapt_model",
        "load_model",
        "register_commands",
        "register_executors",
        "register_explainers",
        "register_metrics",
        "register_readers",
    ]
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


def test_hook_load_model(fresh_registry, cnn):
    class Plugin:
        @xai_core.hookimpl
        def load_model(self, spec, options):
            if spec.startswith("mine:"):
                return cnn, {"classes": options["num_classes"]}
            return None

    fresh_registry.register_plugin(Plugin(), "mine", distribution="mine-dist", version="1")
    from xai_core.io.models import load_model

    model, info = load_model("mine:net", num_classes=4)
    assert model is cnn
    assert info == {"kind": "mine", "classes": 4, "loader": "mine-dist"}


def test_hook_register_readers(fresh_registry, tmp_path):
    from xai_core.io import find_inputs, read_item
    from xai_core.io.inputs import LoadedInput

    class Flat:
        name = "flat"

        def claims(self, path):
            return path.suffix == ".flat"

        def read(self, path, options):
            options.check_size(path, (1, 2, 2), 4)
            return LoadedInput(np.full((1, 2, 2), 0.5, np.float32), np.zeros((2, 2), np.uint8))

    class Plugin:
        @xai_core.hookimpl
        def register_readers(self, register):
            register(Flat())  # an instance is fine too

    fresh_registry.register_plugin(Plugin(), "flat-plugin")
    (tmp_path / "a.flat").write_text("")
    (item,) = find_inputs([tmp_path])
    assert item.kind == "flat"
    assert read_item(item).array.mean() == 0.5
    from xai_core.core.errors import InputTooLargeError

    with pytest.raises(InputTooLargeError):
        read_item(item, max_input_bytes=8)


def test_hook_register_executors(fresh_registry):
    from xai_core.core.executors import Partial, run

    class Twice:
        name = "twice"

        def map(self, step, batches):
            for batch in batches:
                yield step(batch) + step(batch)

        def reduce(self, parts):
            return sum(parts, Partial(0, 0))

    class Plugin:
        @xai_core.hookimpl
        def register_executors(self, register):
            register(Twice)

    fresh_registry.register_plugin(Plugin(), "twice-plugin")
    assert fresh_registry.executor_names() == ["local", "ray", "twice"]  # with xai-ray
    merged = run("twice", lambda b: Partial(b, 1), [1, 2, 3])
    assert (merged.value, merged.images) == (12, 6)
    assert run("local", lambda b: Partial(b, 1), [1, 2, 3]).value == 6
