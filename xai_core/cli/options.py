"""The options several ``xai`` commands share, defined once, and the parsing of option values.

:class:`RunOptions` holds the options that ``explain``, ``compare`` and ``audit`` all take (how
the model is loaded, how the inputs are read, where it runs); :func:`run_options` gives a
command all of them in place of its one ``RunOptions`` parameter. A field added to
``RunOptions`` is an option of the three commands: nothing else to edit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer

from xai_core.core.errors import OptionError
from xai_core.core.executors import get_executor

ModelArg = Annotated[
    str,
    typer.Argument(
        help="An ONNX or TorchScript file, a state_dict with --arch, a HF folder, or demo:NAME."
    ),
]
InputsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Image files (PNG/JPEG), DICOM files or series folders, NIfTI volumes, or folders."
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")]
ArchOpt = Annotated[
    str | None,
    typer.Option(help="Architecture of a state_dict: torchvision (resnet18) or timm:NAME."),
]
ClassesOpt = Annotated[
    int | None, typer.Option(help="Number of classes, if it cannot be read from the state_dict.")
]
SizeOpt = Annotated[str | None, typer.Option(help="Resize to H,W (or D,H,W for volumes).")]
MeanOpt = Annotated[str | None, typer.Option(help="Per-channel mean, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225.")]
ChannelsOpt = Annotated[
    int | None,
    typer.Option(
        help="Channels the model takes (1 or 3); grey is repeated to RGB, RGB turned grey."
    ),
]
SliceOpt = Annotated[
    int | None,
    typer.Option(help="Explain a volume slice by slice along axis 0 (D), 1 (H) or 2 (W)."),
]
WindowOpt = Annotated[
    str | None,
    typer.Option(
        help="DICOM window CENTER,WIDTH overriding the file's (e.g. -600,1500 for lungs)."
    ),
]
TargetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        "-t",
        help="Class index to explain (repeat for several, or 'all'); default: top.",
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available.")]


# -- parsing option values -------------------------------------------------------------------


def ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{what} must be integers separated by commas; got {text!r}."
        ) from None


def floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{what} must be numbers separated by commas; got {text!r}."
        ) from None


def value(text: str) -> Any:
    """An option value: JSON when it parses (numbers, lists, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_values(pairs: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} takes KEY=VALUE; got {pair!r}.") from None
        out[key.strip()] = value(text)
    return out


def nested(pairs: list[str] | None, what: str) -> dict[str, dict[str, Any]]:
    """``name.key=value`` pairs grouped by name."""
    out: dict[str, dict[str, Any]] = {}
    for key, v in key_values(pairs, what).items():
        name, dot, option = key.partition(".")
        if not dot:
            raise typer.BadParameter(f"{what} takes NAME.KEY=VALUE; got {key!r}.") from None
        out.setdefault(name, {})[option] = v
    return out


def caller_options(options: dict[str, Any], flag: str) -> None:
    """Callables (``progress``) are supplied by the command itself: refuse them as settings."""
    if "progress" in options:
        raise typer.BadParameter(
            f"progress is drawn by xai itself (a bar on a terminal, lines on stderr otherwise); "
            f"it cannot be set with {flag}."
        )


def method_options(pairs: list[str] | None) -> dict[str, Any]:
    """``-O KEY=VALUE`` options of one method, parsed and checked."""
    options = key_values(pairs, "--option")
    caller_options(options, "-O")
    return options


def targets(values: list[str] | None) -> Any:
    if not values:
        return None
    if values == ["all"]:
        return "all"
    try:
        classes = [int(v) for v in values]
    except ValueError:
        raise typer.BadParameter(
            "--target takes class indices (repeat it for several) or 'all'."
        ) from None
    return classes[0] if len(classes) == 1 else classes


# -- the options of the commands that run a method over files ----------------------------------


@dataclass(frozen=True)
class Loaded:
    """What :meth:`RunOptions.load` returns: the model on its device, what the loader found out
    about it (``info``), the preprocessing of the inputs, and the device."""

    model: Any
    info: dict[str, Any]
    preprocess: Any  # xai_core.io.preprocess.Preprocess
    device: torch.device


@dataclass(frozen=True)
class RunOptions:
    """The options ``explain``, ``compare`` and ``audit`` share: each field is one option of all
    three (its annotation is its ``typer`` declaration, its default the option's)."""

    arch: ArchOpt = None
    num_classes: ClassesOpt = None
    size: SizeOpt = None
    mean: MeanOpt = None
    std: StdOpt = None
    channels: ChannelsOpt = None
    window: WindowOpt = None
    device: DeviceOpt = None

    @property
    def dicom_window(self) -> tuple[float, ...] | None:
        """``--window`` parsed: the DICOM window (center, width) that overrides the file's."""
        return floats(self.window, "--window")

    def load(self, model_spec: str, *, slice_axis: int | None = None) -> Loaded:
        """The model of ``model_spec`` on the device, and the preprocessing of the inputs: the
        options given, then the model's sidecar, then the model's own defaults."""
        from xai_core.cli.jobs import pick_device
        from xai_core.io.models import load_model
        from xai_core.io.preprocess import Preprocess

        dev = pick_device(self.device)  # a device this machine lacks fails before the loading
        model, info = load_model(model_spec, arch=self.arch, num_classes=self.num_classes)
        if isinstance(model, torch.nn.Module):
            model = model.to(dev)
        sidecar_source = info.get("path") if info.get("kind") != "demo" else None
        preprocess = Preprocess.from_sidecar(
            sidecar_source,
            size=ints(self.size, "--size"),
            mean=floats(self.mean, "--mean"),
            std=floats(self.std, "--std"),
            channels=self.channels,
            slice_axis=slice_axis,
        )
        if info.get("preprocess"):  # the model's own defaults (demo, timm, Hugging Face)
            preprocess = Preprocess(
                **{
                    **info.get("preprocess", {}),
                    **{k: v for k, v in vars(preprocess).items() if v is not None},
                }
            )
        return Loaded(model, info, preprocess, dev)


DEFAULTS = RunOptions()  # the default of a command's RunOptions parameter (never used)

Command = TypeVar("Command", bound=Callable[..., Any])


def run_options(command: Command) -> Command:
    """Give ``command`` every :class:`RunOptions` option: its one parameter annotated
    ``RunOptions`` is replaced, at its place, by one parameter per field, and the command is
    called with them gathered into that ``RunOptions``."""
    signature = inspect.signature(command, eval_str=True)
    (name,) = (p.name for p in signature.parameters.values() if p.annotation is RunOptions)
    hints = typing.get_type_hints(RunOptions, include_extras=True)
    shared = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=f.default,
            annotation=hints[f.name],
        )
        for f in dataclasses.fields(RunOptions)
    ]
    parameters: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        parameters += shared if p.name == name else [p]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        given = {p.name: kwargs.pop(p.name) for p in shared if p.name in kwargs}
        return command(**kwargs, **{name: RunOptions(**given)})

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return typing.cast(Command, wrapper)


# Where dataset work runs (`xai audit`): an executor by name, made with the options given
# (an executor takes its options as keyword arguments, e.g. xai-ray's RayExecutor).
EngineOpt = Annotated[
    str,
    typer.Option(help="Executor of the batches: local (this process) or a plugin's, e.g. ray."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(help="--engine ray: a cluster (auto, ray://HOST:10001); default: start one here."),
]
WorkersOpt = Annotated[
    int | None, typer.Option(help="--engine ray: worker processes (default: one per CPU).")
]
GpusPerWorkerOpt = Annotated[
    float | None, typer.Option(help="--engine ray: GPUs each worker reserves (0.5 shares one).")
]


def engine_executor(name: str, **options: Any) -> Any:
    """``--engine NAME`` as it is, or with options given an instance of that executor made with
    them; an option the executor does not take is an OptionError naming the flag."""
    given = {key: value for key, value in options.items() if value is not None}
    if not given:
        return name
    cls = type(get_executor(name))
    try:
        inspect.signature(cls).bind(**given)
    except TypeError as exc:
        flags = ", ".join("--" + key.replace("_", "-") for key in given)
        raise OptionError(f"--engine {name} does not take {flags}: {exc}.") from exc
    return cls(**given)
