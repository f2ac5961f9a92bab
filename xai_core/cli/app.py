"""The ``xai`` command line. Plugins add commands through the ``register_commands`` hook.

Each command imports the workflows it runs inside its function: ``xai --help``, shell completion
and ``xai plugins`` then start without loading torch's model zoo, the readers or the report.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from xai_core.cli.options import (
    DEFAULTS,
    AddressOpt,
    ArchOpt,
    ClassesOpt,
    EngineOpt,
    GpusPerWorkerOpt,
    InputsArg,
    ModelArg,
    OutOpt,
    RunOptions,
    SliceOpt,
    TargetOpt,
    WorkersOpt,
    caller_options,
    engine_executor,
    method_options,
    nested,
    run_options,
    targets,
)
from xai_core.core.errors import (
    CapabilityError,
    ChannelMismatchError,
    InputRankError,
    SpatialSizeError,
    UnknownLayerError,
    UnknownMethodError,
    XaiError,
)
from xai_core.core.progress import LineProgress
from xai_core.core.registry import get_registry

app = typer.Typer(
    name="xai",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # main() reports errors; --debug shows the traceback
)

DEBUG_ENV = "XAI_CORE_DEBUG"
_debug = False  # set by --debug (the root callback runs before the command)


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show tracebacks of errors (or set {DEBUG_ENV}=1)."),
    ] = False,
) -> None:
    """Explain what image models look at. Methods come from installed plugins: `xai plugins`."""
    global _debug
    _debug = _debug or debug
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
    columns = ("name", "kind", "scope", "dependence", "requires", "plugin", "version", "status")
    for column in columns:
        table.add_column(column, no_wrap=column in ("name", "dependence", "plugin"))
    plain = not sys.stdout.isatty()  # a log or a pipe: one line per plugin, tab-separated
    lines = ["\t".join(columns)]
    for row in rows:
        status = row["status"]
        if status != "ok":
            status = f"[red]{_plain(status)}[/red]: {_plain(row.get('error', ''))}"
        elif row.get("note"):  # precedence, e.g. which models a plugin's adapter is asked for
            status = f"{status}: {_plain(row['note'])}"
        kind = row.get("kind", "plugin")
        if kind == "metric":
            kind = f"metric ({row['better']} is better)"
        cells = (
            row["name"],
            kind,
            row.get("scope") or "",
            row.get("dependence") or "",
            ", ".join(r for r in row.get("requires", []) if r != "forward"),
            str(row.get("plugin") or ""),
            str(row.get("version") or ""),
        )  # named by third-party plugins: printed as written, never as markup
        table.add_row(*(_plain(cell) for cell in cells), status)
        if plain:
            text = row["status"] if row["status"] == "ok" else f"{row['status']}: "
            if row["status"] != "ok":
                text += str(row.get("error", ""))
            elif row.get("note"):
                text += f": {row['note']}"
            cells = (*cells, text)
            lines.append("\t".join(_UNPRINTABLE.sub(" ", str(cell)) for cell in cells))
    if plain:
        print("\n".join(lines))
    else:
        Console().print(table)
    if not rows:
        typer.echo("No explanation methods are installed; see README.md for the install command.")


class _Reporter:
    """The CLI's ``progress(done, total, what)`` (:mod:`xai_core.core.progress`): a rich bar
    with the throughput and the time left on a terminal; elsewhere (a log, CI, a pipe) a plain
    line on stderr every ``interval`` seconds or 10 % of the work, whichever comes first,
    without escape codes (:class:`~xai_core.core.progress.LineProgress`). ``unit`` names what
    the counts count (inputs, images, steps)."""

    def __init__(self, title: str, *, interval: float = 5.0, unit: str = "steps") -> None:
        self.title, self.unit = title, unit
        self.tty = sys.stderr.isatty()
        self.lines = LineProgress(
            title, unit=unit, interval=interval, clean=lambda line: _UNPRINTABLE.sub("?", line)
        )
        self.bar: Progress | None = None

    def __enter__(self) -> _Reporter:
        if self.tty:
            self.bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(_plain(self.title), total=None, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, done: float, total: int | None, what: str) -> None:
        if self.bar is None:
            self.lines(done, total, what)
            return
        throughput = self.lines.throughput
        throughput.update(done)
        rate = "" if throughput.rate is None else f"{throughput.rate:.3g} {self.unit}/s"
        self.bar.update(
            self.task, completed=done, total=total, description=_plain(what), rate=rate
        )


@app.command("explain")
@run_options
def explain_command(
    model: ModelArg,
    inputs: InputsArg,
    method: Annotated[str, typer.Option("--method", "-m", help="Method name (see `xai plugins`).")],
    out: OutOpt = Path("xai-out"),
    target: TargetOpt = None,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer", "-l", help="Layer to explain (repeat for several); default: automatic."
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-O", help="Method option KEY=VALUE, e.g. -O window=16 -O stride=8."
        ),
    ] = None,
    shared: RunOptions = DEFAULTS,
    slice_axis: SliceOpt = None,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
) -> None:
    """Explain each input with one method: overlays, raw maps (.npy), scores and an HTML report.

    A rerun skips inputs finished for the same model, method, options, targets and
    preprocessing, and redoes the others; unreadable files are reported and skipped.
    With --engine ray the inputs are read and explained on Ray workers; the outputs are
    written here, the same as the local engine's (docs/scale.md).
    """
    import xai_core
    from xai_core.cli.jobs import check_method, explain_files, model_identity

    options = method_options(option)
    if layer:
        options["layers" if len(layer) > 1 else "layer"] = layer if len(layer) > 1 else layer[0]
    executor = engine_executor(
        engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    out = out.absolute()  # resolved once: nothing below depends on the working directory
    loaded = shared.load(model, slice_axis=slice_axis)
    items = _find_inputs(inputs, out)
    # A whole-run mistake: checked once, up front.
    check_method(xai_core.adapt(loaded.model), method, options)
    with _Reporter(method, unit="inputs") as report:
        summary = explain_files(
            loaded.model,
            items,
            out,
            model_id=model_identity(loaded.info),
            method=method,
            preprocess=loaded.preprocess,
            targets=targets(target),
            options=options,
            class_names=loaded.info.get("class_names"),
            device=loaded.device,
            window=shared.dicom_window,
            progress=report,
            engine=executor,
        )
    _print_summary(summary, out)
    raise typer.Exit(summary.exit_code)


def _find_inputs(inputs: list[Path], out: Path) -> list:
    """The inputs, without the output folder's own files; none at all is a usage error."""
    from xai_core.cli.jobs import find_job_inputs

    items = find_job_inputs(inputs, out)
    if not items:
        raise typer.BadParameter(
            "No readable input files were found (files in the output folder are not inputs).",
            param_hint="INPUTS",
        ) from None
    return items


# C0 and C1 control characters and the bidirectional overrides that reorder what is shown.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _plain(text: Any, *, newlines: bool = False) -> str:
    """User-provided text made safe to print through rich: control characters (escape
    sequences included) shown as ``\\xNN`` / ``\\uNNNN``, and markup such as ``[/red]``
    escaped so that it is printed as written."""

    def show(match: re.Match[str]) -> str:
        char = match.group()
        if newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return escape(_UNPRINTABLE.sub(show, str(text)))


def _print_text(text: str) -> None:
    """Plain text (a Markdown table, a summary) to stdout as it is: on a terminal through rich,
    elsewhere written without wrapping, so a table keeps one row per line at any width."""
    if sys.stdout.isatty():
        Console(highlight=False, soft_wrap=True).print(_plain(text, newlines=True))
    else:
        safe = _UNPRINTABLE.sub(lambda m: m.group() if m.group() in "\n\t" else "?", text)
        print(safe, end="" if safe.endswith("\n") else "\n", flush=True)


def _table_console() -> Console:
    """A console for rich tables: the terminal's width, or, when stdout is not a terminal,
    wide enough that no cell is wrapped (a table takes only the width it needs)."""
    return Console() if sys.stdout.isatty() else Console(width=10_000, no_color=True)


def _print_summary(summary, out: Path) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(
        f"{len(summary.done)} explained, {len(summary.skipped)} already done, "
        f"{len(summary.failed)} failed; report: {_plain(summary.report)}"
    )
    for key, error in summary.failed.items():
        exc = summary.errors.get(key)
        message, hint = _advice(exc) if isinstance(exc, XaiError) else (None, None)
        if message is not None:
            error = f"{type(exc).__name__}: {message}"
        console.print(f"[red]failed[/red] {_plain(key)}: {_plain(error)}")
        if hint:
            console.print(f"  hint: {_plain(hint)}")


COMPARE_BATCH = 8  # images per batch of `xai compare` on another engine than local


@app.command("compare")
@run_options
def compare_command(
    model: ModelArg,
    inputs: InputsArg,
    out: OutOpt = Path("xai-compare"),
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods; default: every method that can run on the model."
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated metrics; default: every installed metric whose needs are met."
        ),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Folder of ground-truth masks named like the inputs (non-zero = region)."
        ),
    ] = None,
    target: TargetOpt = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-O", help="Method option METHOD.KEY=VALUE, e.g. -O occlusion.window=16."
        ),
    ] = None,
    metric_option: Annotated[
        list[str] | None,
        typer.Option(
            "--metric-option", help="Metric option METRIC.KEY=VALUE, e.g. deletion.steps=20."
        ),
    ] = None,
    shared: RunOptions = DEFAULTS,
    budget: Annotated[
        float,
        typer.Option(
            help="Seconds the comparison should take: over it (estimated from a timed forward "
            "and backward pass), options you did not set are made cheaper, and listed. 0: no limit."
        ),
    ] = 120.0,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Images per batch; default: all in one batch (local engine), 8 (other engines)."
        ),
    ] = None,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
) -> None:
    """Run several methods on the inputs and score them with metrics: tables and an HTML report.

    The cost is estimated before the work starts (printed on stderr) and kept within --budget.
    With --engine ray the batches are explained and scored on Ray workers and merged here: the
    same table as the local engine with the same --batch-size (docs/scale.md).
    """
    from xai_core.cli.jobs import compare_files

    methods_options = nested(option, "--option")
    metric_opts = nested(metric_option, "--metric-option")
    for opts in methods_options.values():
        caller_options(opts, "-O")
    for opts in metric_opts.values():
        caller_options(opts, "--metric-option")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    executor = engine_executor(
        engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    if batch_size is None and engine != "local":
        batch_size = COMPARE_BATCH  # one batch would keep every worker but one idle

    out = out.absolute()  # resolved once: nothing below depends on the working directory
    loaded = shared.load(model)
    items = _find_inputs(inputs, out)
    with _Reporter("compare") as report:
        summary = compare_files(
            loaded.model,
            items,
            out,
            preprocess=loaded.preprocess,
            targets=targets(target),
            methods=None if methods is None else [m.strip() for m in methods.split(",")],
            metrics=None if metrics is None else [m.strip() for m in metrics.split(",")],
            masks=masks,
            options=methods_options,
            metric_options=metric_opts,
            class_names=loaded.info.get("class_names"),
            device=loaded.device,
            window=shared.dicom_window,
            progress=report,
            budget=budget if budget > 0 else None,
            notice=lambda text: err.print(_plain(text)),
            engine=executor,
            batch_size=batch_size,
        )
    _print_text(summary.table_markdown)
    if summary.comparison is not None and summary.comparison.economies:
        err.print(
            "economies (to fit --budget; set these options to override): "
            + _plain(", ".join(summary.comparison.economies))
        )
    _print_summary(summary, out)
    raise typer.Exit(summary.exit_code)


@app.command("layers")
def layers_command(
    model: ModelArg,
    arch: ArchOpt = None,
    num_classes: ClassesOpt = None,
) -> None:
    """List a model's layers: the names --layer and -O layer=NAME take, with their types (for an
    ONNX model: its tensors, the operator computing each and its shape)."""
    from xai_core.io.models import load_model
    from xai_core.onnx.adapter import OnnxAdapter, is_onnx_model

    net, _ = load_model(model, arch=arch, num_classes=num_classes)
    if is_onnx_model(net):
        rows = OnnxAdapter(net, providers=["CPUExecutionProvider"]).layer_table()
        _print_text("\n".join(f"{name}\t{op}\t{shape}" for name, op, shape in rows))
        return
    if not isinstance(net, torch.nn.Module):
        raise CapabilityError(
            "This model has no named layers (TorchScript): use a method that needs no layer, "
            "such as occlusion."
        )
    lines = [f"{name}\t{type(module).__name__}" for name, module in net.named_modules() if name]
    _print_text("\n".join(lines))


@app.command("demo")
def demo_command(
    out: OutOpt = Path("xai-demo"),
) -> None:
    """Run every method on the embedded synthetic chest X-ray demo and write a report.

    No network, no downloads: the data is generated and the small models ship with xai-core.
    """
    from xai_core.demo.run import run_demo

    out = out.absolute()
    with _Reporter("demo") as report:
        steps = iter(range(1_000_000))  # the demo says what it does, not how much is left
        result = run_demo(out, progress=lambda msg: report(next(steps), None, msg))
    _table_console().print(result.summary_table())
    Console(stderr=True, highlight=False).print(f"report: {_plain(result.report)}")


@app.command("audit")
@run_options
def audit_command(
    model: ModelArg,
    inputs: InputsArg,
    method: Annotated[
        str, typer.Option("--method", "-m", help="Local method that explains each image.")
    ] = "gradcam",
    out: OutOpt = Path("xai-audit"),
    masks: Annotated[
        Path | None,
        typer.Option(help="Folder of masks of where the evidence lies, named like the inputs."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-O", help="Method option KEY=VALUE, e.g. -O window=16."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    reference: Annotated[
        str, typer.Option(help="Expected share: auto, masks, uniform or classes (docs/audit.md).")
    ] = "auto",
    min_share: Annotated[
        float, typer.Option(help="Smallest unexplained share of a class's attribution flagged.")
    ] = 0.2,
    min_lift: Annotated[
        float, typer.Option(help="Times a uniform share a pixel must hold to be in a region.")
    ] = 5.0,
    min_fraction: Annotated[
        float, typer.Option(help="Smallest fraction of a class's images concentrated there.")
    ] = 0.5,
    fail_on_flags: Annotated[
        bool, typer.Option(help="Exit with status 1 when a region is flagged (for CI).")
    ] = False,
    checkpoint_every: Annotated[
        float,
        typer.Option(
            help="Seconds between saves of the finished batches under --out (a rerun resumes "
            "from them); 0: after every batch."
        ),
    ] = 30.0,
    shared: RunOptions = DEFAULTS,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
) -> None:
    """Look for shortcuts: regions holding a class's attribution across the inputs (docs/audit.md).

    Images are grouped by the model's predicted class; writes report.html and audit.json.
    A rerun with the same --out skips the batches finished for the same model, method, options
    and inputs (killed or interrupted runs included) and gives the same audit.
    """
    from xai_core.report.audit import write_audit
    from xai_core.workflows.audit import audit
    from xai_core.workflows.datasets import DataStream

    out = out.absolute()
    loaded = shared.load(model)
    stream = DataStream(
        [str(p) for p in inputs],
        batch_size=batch_size,
        device=loaded.device,
        preprocess=loaded.preprocess,
        masks=masks,
        window=shared.dicom_window,
    )
    options = method_options(option)
    executor = engine_executor(
        engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker
    )
    with _Reporter(f"audit ({method})", unit="images") as report:
        result = audit(
            loaded.model,
            stream,
            method=method,
            options=options,
            class_names=loaded.info.get("class_names"),
            reference=reference,
            min_share=min_share,
            min_lift=min_lift,
            min_fraction=min_fraction,
            progress=report,
            engine=executor,
            resume=out,
            checkpoint_every=checkpoint_every,
        )
    written = write_audit(result, out)
    _print_text(result.summary())
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    for key, error in result.failed.items():
        errors.print(f"[red]failed[/red] {_plain(key)}: {_plain(error)}")
    if result.resumed:
        errors.print(f"{result.resumed} images were audited by an earlier run into this --out")
    errors.print(f"report: {_plain(written)}")
    raise typer.Exit(1 if fail_on_flags and result.flags else 0)


_commands_added = False


def build_app() -> typer.Typer:
    """The root app with every plugin's commands added (each plugin guarded, added once)."""
    global _commands_added
    if not _commands_added:
        _commands_added = True
        get_registry().add_commands(app)  # built-in commands cannot be replaced
    return app


# typer vendors click in recent versions and uses the real one in older: take the class it raises.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_HINTS = {
    UnknownMethodError: "`xai plugins` lists the installed methods and what each needs.",
}


def _advice(exc: XaiError) -> tuple[str, str | None]:
    """A typed error's message and hint in command-line terms: errors whose advice differs by
    interface carry ``facts`` (what is wrong) apart from their Python advice, and the hint names
    the flag that fixes it."""
    message = getattr(exc, "facts", None) or str(exc)
    details = getattr(exc, "details", {})
    if isinstance(exc, ChannelMismatchError):
        return message, (
            f"pass --channels {details.get('expected')} (grey is repeated to RGB, RGB turned "
            f"grey by luminance)."
        )
    if isinstance(exc, SpatialSizeError):
        size = ",".join(str(s) for s in details.get("expected", ()))
        return message, f"pass --size {size} to resize the inputs to the model's size."
    if isinstance(exc, InputRankError):
        if details.get("got") == 5 and details.get("expected") == 4:
            return message, (
                "the input is a volume (multi-frame DICOM, DICOM series or NIfTI) and the model "
                "is 2D: pass --slice-axis 0 (or 1, 2) to `xai explain` to explain it slice by "
                "slice."
            )
        return message, "this model takes volumes: pass a DICOM series, multi-frame DICOM or NIfTI."
    if isinstance(exc, UnknownLayerError):
        return message, (
            "pass a layer of the model with --layer NAME (or -O layer=NAME); "
            "`xai layers MODEL` lists them."
        )
    return message, next((h for cls, h in _HINTS.items() if isinstance(exc, cls)), None)


def main(argv: list[str] | None = None) -> None:
    """Run ``xai``; known errors become one or two lines on stderr and an exit code:
    2 for a mistake in the request (typed xai-core errors, bad paths, usage), 1 when some inputs
    failed or something unexpected happened, 130 when interrupted (Ctrl-C)."""
    sys.exit(_run(argv))


def _run(argv: list[str] | None) -> int:
    global _debug
    _debug = False  # until this run's --debug, if any, is parsed
    err = Console(stderr=True, highlight=False, soft_wrap=True)  # soft: no newlines inserted
    try:
        code = build_app()(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except _ClickException as exc:  # usage: bad option values, missing arguments
        if type(exc).__name__ == "NoArgsIsHelpError":  # `xai` alone: the help is the message
            if exc.format_message().strip():  # rich help prints itself and leaves this empty
                print(exc.format_message(), file=sys.stderr)
            return exc.exit_code
        if _debug_on():
            traceback.print_exc()
        err.print(f"error: {_plain(exc.format_message(), newlines=True)}")
        command = getattr(getattr(exc, "ctx", None), "command_path", None) or "xai"
        err.print(f"hint: `{_plain(command)} --help` lists the arguments and options.")
        return exc.exit_code
    except typer.Abort:
        code = 130
    except KeyboardInterrupt:
        code = 130
    except (XaiError, OSError) as exc:
        if _debug_on():
            traceback.print_exc()
        if isinstance(exc, XaiError):
            message, hint = _advice(exc)
        else:
            message, hint = f"{type(exc).__name__}: {exc}", None
        err.print(f"error: {_plain(message, newlines=True)}")
        if hint:
            err.print(f"hint: {hint}")
        return 2
    except Exception as exc:  # a bug somewhere: a short message, the traceback in a file
        if _debug_on():
            traceback.print_exc()
            return 1
        err.print(f"error: unexpected {type(exc).__name__}: {_plain(exc, newlines=True)}")
        err.print(f"details: {_plain(_save_traceback())} (or rerun with --debug)")
        return 1
    if code == 130:  # typer turns Ctrl-C into exit code 130
        err.print(
            "interrupted (Ctrl-C); finished outputs are kept: rerunning `xai explain` resumes."
        )
    return code if isinstance(code, int) else 0


def _debug_on() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _save_traceback() -> str:
    fd, path = tempfile.mkstemp(prefix="xai-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        traceback.print_exc(file=f)
    return path


if __name__ == "__main__":
    main()
