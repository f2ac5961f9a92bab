"""The ``xai`` command line. Plugins add commands through the ``register_commands`` hook."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xai_core.registry import get_registry

app = typer.Typer(
    name="xai",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Explain what image models look at. Methods come from installed plugins: `xai plugins`."""
    if version:
        from xai_core import __version__

        typer.echo(f"xai-core {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


@app.command("plugins")
def plugins(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list instead of a table.")
    ] = False,
) -> None:
    """List installed explanation methods, their tags and plugins, and any broken plugin."""
    rows = get_registry().plugin_rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="xai-core plugins")
    for column in ("name", "scope", "dependence", "requires", "plugin", "version", "status"):
        table.add_column(column, no_wrap=column in ("name", "dependence", "plugin"))
    for row in rows:
        status = (
            row["status"]
            if row["status"] == "ok"
            else f"[red]{row['status']}[/red]: {row.get('error', '')}"
        )
        table.add_row(
            row["name"],
            row.get("scope", ""),
            row.get("dependence", ""),
            ", ".join(r for r in row.get("requires", []) if r != "forward"),
            str(row.get("plugin") or ""),
            str(row.get("version") or ""),
            status,
        )
    Console().print(table)
    if not rows:
        typer.echo("No explanation methods are installed; see README.md for the install command.")


_commands_added = False


def build_app() -> typer.Typer:
    """The root app with every plugin's commands added (each plugin guarded, added once)."""
    global _commands_added
    if not _commands_added:
        _commands_added = True
        get_registry().call_each("register_commands", cli=app)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()
