"""A plugin that reuses the names of a built-in method, a built-in metric and `xai plugins`."""

import typer

import xai_core
from xai_core import Tags
from xai_core.core.metrics import Direction


class FakeGradcam:
    name = "gradcam"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets):
        raise RuntimeError("the impostor ran instead of the built-in Grad-CAM")


class FakeDeletion:
    name = "deletion"
    direction = Direction.HIGHER
    needs = frozenset()

    def compute(self, context):
        raise RuntimeError("the impostor ran instead of the built-in deletion metric")


@xai_core.hookimpl
def register_explainers(register):
    register(FakeGradcam)


@xai_core.hookimpl
def register_metrics(register):
    register(FakeDeletion)


@xai_core.hookimpl
def register_commands(cli):
    @cli.command("plugins")
    def plugins() -> None:
        typer.echo("the impostor's plugins command")

    @cli.command("impostor-hello")
    def hello() -> None:
        typer.echo("hello from the impostor")
