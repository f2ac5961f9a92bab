"""Loading a model named on the command line, without ever unpickling arbitrary objects.

Accepted ``spec`` values:

* ``path/to/model.onnx``: returned as the path string; the core's ONNX adapter opens it.
* a TorchScript file (``torch.jit.save``): loaded with ``torch.jit.load`` on the CPU.
  TorchScript archives are read by TorchScript's own loader, which builds only TorchScript types.
* a state_dict file together with ``arch``, a torchvision architecture name: the network is built
  with ``weights=None`` and the file read with ``torch.load(weights_only=True)``, which accepts
  tensors and plain containers only. Checkpoints that wrap the weights in ``"state_dict"`` or
  ``"model"``, and the ``module.`` prefix of DataParallel, are handled.
* ``demo:<name>``: a demo model shipped with xai-core (:mod:`xai_core.demo`).

A ``.pt``/``.pth`` file holding a whole pickled ``nn.Module`` is refused: unpickling it could run
any code. Re-export it with ``torch.jit.script``/``trace``, or save its ``state_dict``.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xai_core.errors import ModelError, did_you_mean
from xai_core.io.preprocess import read_sidecar

DEMO_PREFIX = "demo:"
# Keys under which training scripts commonly nest the weights in a checkpoint dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by nn.DataParallel / DistributedDataParallel and by torch.compile.
PREFIXES = ("module.", "_orig_mod.")
LISTED = 5  # how many missing/unexpected keys an error message shows


def load_model(
    spec: str, *, arch: str | None = None, num_classes: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """The model object for ``spec`` (see the module doc) and a dict describing it.

    The dict has ``kind`` ("onnx", "torchscript", "torchvision" or "demo"), ``path``, and for
    files with a sidecar JSON its ``sidecar`` path and ``class_names``. Modules are in eval mode.
    """
    if spec.startswith(DEMO_PREFIX):
        return _load_demo(spec[len(DEMO_PREFIX) :])
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"Model file not found: {spec}")
    info: dict[str, Any] = {"path": str(path)}
    sidecar = read_sidecar(path)
    if sidecar:
        info["sidecar"] = sidecar["path"]
        info["class_names"] = sidecar.get("class_names")
    if path.suffix.lower() == ".onnx":
        return str(path), {"kind": "onnx", **info}
    if is_torchscript(path):
        if arch is not None:
            warnings.warn(
                f"{path} is a TorchScript file, which holds its own architecture; "
                f"--arch {arch} is ignored.",
                UserWarning,
                stacklevel=2,
            )
        return _load_torchscript(path), {"kind": "torchscript", **info}
    if arch is None:
        raise ModelError(
            f"{path} is not TorchScript or ONNX, so xai-core needs the architecture to load its "
            f"weights into: pass --arch (a torchvision name such as resnet18 or densenet121). "
            f"A file holding a whole pickled model is never loaded, since unpickling can run "
            f"arbitrary code: export it with torch.jit.script/trace or torch.onnx, or save its "
            f"state_dict()."
        )
    model, built = _load_torchvision(path, arch, num_classes)
    return model, {"kind": "torchvision", **info, **built}


def is_torchscript(path: Path) -> bool:
    """True for a ``torch.jit.save`` archive: a zip with ``code/`` or ``constants.pkl`` entries.

    ``torch.save`` writes zips too, with ``data.pkl`` and tensor data only. Entries sit under a
    folder named after the file (``code.pt`` holds ``code/data.pkl``), so the name that counts
    is the one below that folder.
    """
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.split("/")[1:2] in (["code"], ["constants.pkl"]) for n in names)


def _load_torchscript(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # "jit.load is deprecated": nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and others for bad archives
        raise ModelError(f"Cannot load the TorchScript model {path}: {exc}") from exc
    return model.eval()


def _load_demo(name: str) -> tuple[Any, dict[str, Any]]:
    try:
        demo = importlib.import_module("xai_core.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "xai_core.demo":
            raise  # the demo package exists but something it needs is missing: show that
        raise ModelError("This xai-core installation has no demo models.") from exc
    if not hasattr(demo, "load_model"):
        raise ModelError("This xai-core installation has no demo models (no demo.load_model).")
    model = demo.load_model(name)
    return model, {
        "kind": "demo",
        "name": name,
        "class_names": list(demo.CLASS_NAMES[name]),
        "preprocess": demo.preprocess_settings(name),  # the CLI's defaults for this model
    }


# -- torchvision + state_dict ----------------------------------------------------------------


def _load_torchvision(
    path: Path, arch: str, num_classes: int | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    builder = _torchvision_builder(arch)
    state = _unwrap(_read_state_dict(path), path)
    if num_classes is None:
        num_classes = _infer_num_classes(builder, state, arch, path)
    try:
        model = builder(weights=None, num_classes=num_classes)
    except Exception as exc:
        raise ModelError(f"Cannot build {arch} with num_classes={num_classes}: {exc}") from exc
    _check_keys(model, state, arch, path)
    model.load_state_dict(state, strict=False)  # strict checks were done above, with clear words
    return model.eval(), {"arch": arch, "num_classes": num_classes}


def _torchvision_builder(arch: str) -> Any:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelError("--arch needs torchvision: pip install 'xai-core[vision]'.") from exc
    names = torchvision.models.list_models()
    if arch not in names:
        raise ModelError(
            f"Unknown torchvision architecture {arch!r}.{did_you_mean(arch, names)} "
            f"See torchvision.models.list_models()."
        )
    return torchvision.models.get_model_builder(arch)


def _read_state_dict(path: Path) -> Any:
    try:
        # weights_only=True: tensors and plain containers only; never run a pickle's code.
        with warnings.catch_warnings():  # a note on pickle protocols, not for users
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"Refused to load {path}: it holds Python objects other than weights, and "
            f"unpickling them could run arbitrary code. Save model.state_dict() instead, or "
            f"export the model with torch.jit.script/trace or torch.onnx. ({_first_line(exc)})"
        ) from exc
    except Exception as exc:  # truncated or not a torch file
        raise ModelError(f"Cannot read weights from {path}: {_first_line(exc)}") from exc


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The plain state_dict inside a checkpoint, with parallel/compile prefixes removed."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}; deeper nesting is unheard of
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or _is_state_dict(obj):
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        found = list(obj)[:LISTED] if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelError(
            f"{path} does not hold a state_dict (names mapped to tensors); found {found}."
        )
    state = dict(obj)
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _infer_num_classes(builder: Any, state: dict[str, torch.Tensor], arch: str, path: Path) -> int:
    """Outputs of the classifier: the first dimension of the architecture's last weight.

    The reference network is built on the meta device: no memory, no initialisation cost.
    """
    try:
        with torch.device("meta"):
            reference = builder(weights=None)
    except Exception:  # an architecture whose initialisation needs real values
        reference = builder(weights=None)
    weights = [k for k, v in reference.state_dict().items() if k.endswith("weight") and v.ndim > 1]
    head = weights[-1] if weights else None
    if head is None or head not in state:
        raise ModelError(
            f"Cannot tell the number of classes of {path} for {arch} (no {head!r} in it); "
            f"pass --num-classes, and check that --arch is right."
        )
    return int(state[head].shape[0])


def _check_keys(
    model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path
) -> None:
    expected = model.state_dict()
    # Old checkpoints lack BatchNorm's step counter, which inference never reads.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs {arch} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:LISTED])}{more}")
    raise ModelError(
        f"The weights in {path} do not fit torchvision's {arch} ({'; '.join(parts)}). Check "
        f"--arch, and --num-classes if only the classifier differs."
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
