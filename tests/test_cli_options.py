"""The options explain, compare and audit share are defined once (xai_core/cli/options.py)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from typer.testing import CliRunner

from xai_core.cli.app import build_app
from xai_core.cli.options import DEFAULTS, RunOptions, run_options


def test_every_shared_option_is_an_option_of_explain_compare_and_audit():
    commands = {c.name: c for c in typer.main.get_command(build_app()).commands.values()}
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    for name in ("explain", "compare", "audit"):
        params = {p.name for p in commands[name].params}
        assert fields <= params, (name, fields - params)
    assert not fields & {p.name for p in commands["demo"].params}


def test_a_command_gets_the_shared_options_gathered_at_their_place():
    seen = []

    @run_options
    def command(
        name: Annotated[str, typer.Argument()],
        shared: RunOptions = DEFAULTS,
        last: Annotated[int, typer.Option()] = 0,
    ) -> None:
        seen.append((name, shared, last))

    app = typer.Typer(add_completion=False)
    app.command()(command)
    result = CliRunner().invoke(app, ["x", "--arch", "resnet18", "--window", "-600,1500"])
    assert result.exit_code == 0, result.output
    ((name, shared, last),) = seen
    assert name == "x" and last == 0
    assert shared == RunOptions(arch="resnet18", window="-600,1500")
    assert shared.dicom_window == (-600.0, 1500.0)
    order = [p.name for p in typer.main.get_command(app).params]
    assert order == ["name", *(f.name for f in dataclasses.fields(RunOptions)), "last"]
