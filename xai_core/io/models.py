"""Loading a model named on the command line, without ever unpickling arbitrary objects.

Accepted ``spec`` values:

* ``path/to/model.onnx``: returned as the path string; the core's ONNX adapter opens it.
* a TorchScript file (``torch.jit.save``): loaded with ``torch.jit.load`` on the CPU.
  TorchScript archives are read by TorchScript's own loader, which builds only TorchScript types.
* a state_dict file together with ``arch``, a torchvision architecture name: the network is built
  with ``weights=None`` and the file read with ``torch.load(weights_only=True)``, which accepts
  tensors and plain containers only. Checkpoints that wrap the weights in ``"state_dict"`` or
  ``"model"``, and the ``module.`` prefix of DataParallel, are handled.
* a state_dict file (``torch.save`` or ``.safetensors``) with ``arch="timm:<name>"``: built by
  ``timm.create_model(name, pretrained=False, num_classes=K)``; the preprocessing defaults
  (input size, mean, std) come from the model's timm data config.
* a Hugging Face ``save_pretrained`` folder (``config.json`` and ``model.safetensors``, or a
  ``pytorch_model.bin`` read with ``weights_only=True``): built by
  ``AutoModelForImageClassification`` from local files only, never with remote code; its
  ``preprocessor_config.json`` gives preprocessing defaults and ``config.id2label`` the class
  names.
* ``demo:<name>``: a demo model shipped with xai-core (:mod:`xai_core.demo`).

timm and transformers are imported only for such specs, with ``HF_HUB_OFFLINE=1`` while loading:
nothing is downloaded.

A ``.pt``/``.pth`` file holding a whole pickled ``nn.Module`` is refused: unpickling it could run
any code. Re-export it with ``torch.jit.script``/``trace``, or save its ``state_dict``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from xai_core.core.errors import MissingDependencyError, ModelError, did_you_mean
from xai_core.core.registry import get_registry
from xai_core.io.preprocess import Preprocess, read_sidecar

DEMO_PREFIX = "demo:"
TIMM_PREFIX = "timm:"
# Keys under which training scripts commonly nest the weights in a checkpoint dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by nn.DataParallel / DistributedDataParallel and by torch.compile.
PREFIXES = ("module.", "_orig_mod.")
LISTED = 5  # how many missing/unexpected keys an error message shows


def load_model(
    spec: str, *, arch: str | None = None, num_classes: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """The model object for ``spec`` (see the module doc) and a dict describing it.

    The dict has ``kind`` ("onnx", "torchscript", "torchvision", "timm", "huggingface" or
    "demo", or for a plugin's model the plugin's name, with ``loader`` its distribution),
    ``path``, and for files with a sidecar JSON its ``sidecar`` path and
    ``class_names``; ``preprocess`` holds the model's own preprocessing defaults where it has
    them (the CLI's options and the sidecar take precedence). Modules are in eval mode.

    This goes through the ``load_model`` hook: the core's loaders (:data:`BUILTIN_LOADERS`)
    first, then plugins for specs none of them claims (docs/writing-a-plugin.md).
    """
    return get_registry().load_model(spec, arch=arch, num_classes=num_classes)


def load_builtin(
    spec: str, *, arch: str | None = None, num_classes: int | None = None
) -> tuple[Any, dict[str, Any]] | None:
    """The first of the core's loaders that claims ``spec`` loads it; ``None`` if none does
    (a spec that is neither ``demo:`` nor an existing path: plugins are asked next)."""
    for _, claims, load in BUILTIN_LOADERS:
        if claims(spec, arch):
            return load(spec, arch, num_classes)
    return None


def _file_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path)}
    sidecar = read_sidecar(path)
    if sidecar:
        info["sidecar"] = sidecar["path"]
        info["class_names"] = sidecar.get("class_names")
    return info


def _is_file(spec: str) -> bool:
    try:
        return Path(spec).is_file()
    except OSError:  # a name too long for the file system, ...: not a file
        return False


def _ignored_arch(path: Path, arch: str | None, what: str) -> None:
    if arch is not None:
        warnings.warn(
            f"{path} is {what}, which holds its own architecture; --arch {arch} is ignored.",
            UserWarning,
            stacklevel=4,
        )


def _demo_spec(spec: str, arch: str | None, num_classes: int | None) -> tuple[Any, dict]:
    return _load_demo(spec[len(DEMO_PREFIX) :])


def _huggingface_spec(spec: str, arch: str | None, num_classes: int | None) -> tuple[Any, dict]:
    path = Path(spec)
    if arch is not None:
        warnings.warn(
            f"{path} is a Hugging Face folder, whose config.json names the architecture; "
            f"--arch {arch} is ignored.",
            UserWarning,
            stacklevel=4,
        )
    return _load_huggingface(path, num_classes)


def _onnx_spec(spec: str, arch: str | None, num_classes: int | None) -> tuple[Any, dict]:
    path = Path(spec)
    return str(path), {"kind": "onnx", **_file_info(path)}


def _torchscript_spec(spec: str, arch: str | None, num_classes: int | None) -> tuple[Any, dict]:
    path = Path(spec)
    _ignored_arch(path, arch, "a TorchScript file")
    return _load_torchscript(path), {"kind": "torchscript", **_file_info(path)}


def _timm_spec(spec: str, arch: str | None, num_classes: int | None) -> tuple[Any, dict]:
    path = Path(spec)
    model, built = _load_timm(path, str(arch)[len(TIMM_PREFIX) :], num_classes)
    return model, {"kind": "timm", **built, **_file_info(path)}


def _torchvision_spec(spec: str, arch: str | None, num_classes: int | None) -> tuple[Any, dict]:
    path = Path(spec)
    if arch is None:
        raise ModelError(
            f"{path} is not TorchScript or ONNX, so xai-core needs the architecture to load its "
            f"weights into: pass --arch (a torchvision name such as resnet18 or densenet121). "
            f"A file holding a whole pickled model is never loaded, since unpickling can run "
            f"arbitrary code: export it with torch.jit.script/trace or torch.onnx, or save its "
            f"state_dict()."
        )
    model, built = _load_torchvision(path, arch, num_classes)
    return model, {"kind": "torchvision", **_file_info(path), **built}


# The core's loaders, asked in this order: (name, claims(spec, arch), load(spec, arch, classes)).
# Together they claim ``demo:`` specs and every existing file or folder; the last one takes any
# other file (a state_dict), so a plugin can never take over a file that exists.
BUILTIN_LOADERS = (
    ("demo", lambda spec, arch: spec.startswith(DEMO_PREFIX), _demo_spec),
    ("huggingface", lambda spec, arch: Path(spec).is_dir(), _huggingface_spec),
    ("onnx", lambda spec, arch: _is_file(spec) and spec.lower().endswith(".onnx"), _onnx_spec),
    ("torchscript", lambda spec, arch: _is_file(spec) and is_torchscript(Path(spec)),
     _torchscript_spec),
    ("timm", lambda spec, arch: _is_file(spec) and str(arch).startswith(TIMM_PREFIX), _timm_spec),
    ("torchvision", lambda spec, arch: _is_file(spec), _torchvision_spec),
)  # fmt: skip


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
    _check_keys(model, state, f"torchvision's {arch}", path)
    model.load_state_dict(state, strict=False)  # strict checks were done above, with clear words
    return model.eval(), {"arch": arch, "num_classes": num_classes}


def _torchvision_builder(arch: str) -> Any:
    try:
        import torchvision  # an optional dependency (the `vision` extra)
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
    if path.suffix.lower() == ".safetensors":  # tensors only, by construction
        load_file = _optional("safetensors.torch", "hf").load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, truncated headers, ...
            raise ModelError(f"Cannot read weights from {path}: {_first_line(exc)}") from exc
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
    """Raise a :class:`ModelError` listing missing, unexpected and mis-shaped weights; ``arch``
    names the architecture in the message (``"torchvision's resnet18"``)."""
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
        f"The weights in {path} do not fit {arch} ({'; '.join(parts)}). Check "
        f"--arch, and --num-classes if only the classifier differs."
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- timm and Hugging Face -------------------------------------------------------------------


def _optional(module: str, extra: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"Loading this model needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'xai-core[{extra}]'."
        ) from exc


@contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` while loading, also for a huggingface_hub imported earlier (it reads
    the variable once, at import): no download, no version check, no telemetry."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = importlib.import_module("huggingface_hub.constants") if _has_hub() else None
    flag = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
        if constants is not None:
            constants.HF_HUB_OFFLINE = flag


def _has_hub() -> bool:
    return importlib.util.find_spec("huggingface_hub") is not None


def _load_timm(
    path: Path, name: str, num_classes: int | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    with _offline():
        timm = _optional("timm", "timm")
        if not timm.is_model(name):
            names = timm.list_models()
            raise ModelError(
                f"Unknown timm architecture {name!r}.{did_you_mean(name, names)} See "
                f"timm.list_models()."
            )

        def builder(weights: None = None, **kwargs: Any) -> torch.nn.Module:
            return timm.create_model(name, pretrained=False, **kwargs)

        state = _unwrap(_read_state_dict(path), path)
        if num_classes is None:
            num_classes = _infer_num_classes(builder, state, f"timm:{name}", path)
        try:
            model = builder(num_classes=num_classes)
        except Exception as exc:
            raise ModelError(
                f"Cannot build timm:{name} with num_classes={num_classes}: {exc}"
            ) from exc
        _check_keys(model, state, f"timm's {name}", path)
        model.load_state_dict(state, strict=False)  # checked above, with clear words
        config = timm.data.resolve_data_config({}, model=model)
    preprocess = {
        "channels": int(config["input_size"][0]),
        "size": list(config["input_size"][1:]),
        "mean": list(config["mean"]),
        "std": list(config["std"]),
    }
    info = {"arch": f"timm:{name}", "num_classes": num_classes, "preprocess": preprocess}
    return model.eval(), info


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HF_PICKLE = "pytorch_model.bin"


def _load_huggingface(
    folder: Path, num_classes: int | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is a folder but not a Hugging Face model: it has no config.json. Pass "
            f"the folder written by model.save_pretrained(...), or a model file."
        )
    safetensors = any((folder / name).is_file() for name in HF_WEIGHTS)
    if not safetensors and not (folder / HF_PICKLE).is_file():
        raise ModelError(
            f"{folder} has a config.json but no weights ({', '.join(HF_WEIGHTS)} or {HF_PICKLE})."
        )
    with _offline():
        transformers = _optional("transformers", "hf")
        auto = transformers.AutoModelForImageClassification
        try:
            config = transformers.AutoConfig.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
            if safetensors:
                model = auto.from_pretrained(
                    str(folder),
                    config=config,
                    local_files_only=True,
                    trust_remote_code=False,
                    use_safetensors=True,
                )
            else:  # read the pickle ourselves, tensors only, into a model built from the config
                state = _unwrap(_read_state_dict(folder / HF_PICKLE), folder / HF_PICKLE)
                model = auto.from_config(config, trust_remote_code=False)
                _check_keys(model, state, f"the {config.model_type} model of config.json", folder)
                model.load_state_dict(state, strict=False)
        except ModelError:
            raise
        except Exception as exc:  # unknown model type, remote code, corrupt files, ...
            raise ModelError(
                f"Cannot load the Hugging Face model in {folder}: {_first_line(exc)}"
            ) from exc
    labels = config.id2label or {}
    if num_classes is not None and num_classes != config.num_labels:
        raise ModelError(
            f"--num-classes {num_classes} does not match the {config.num_labels} labels of "
            f"{folder / 'config.json'}."
        )
    info: dict[str, Any] = {
        "path": str(folder),
        "arch": f"hf:{config.model_type}",
        "num_classes": config.num_labels,
        "class_names": [str(labels.get(i, i)) for i in range(config.num_labels)],
    }
    channels = getattr(config, "num_channels", None)
    preprocess = _hf_preprocess(folder / "preprocessor_config.json")
    info["preprocess"] = {**({"channels": channels} if channels in (1, 3) else {}), **preprocess}
    return model.eval(), {"kind": "huggingface", **info}


def _hf_preprocess(path: Path) -> dict[str, Any]:
    """Size, mean and std from a ``preprocessor_config.json`` (``{}`` without one).

    ``size`` is ``{"height", "width"}``, ``{"shortest_edge": s}`` (resized to ``s x s``: xai-core
    does not crop) or an int. Pixels are scaled to [0, 1] before mean/std, as ``do_rescale``
    with ``1/255`` does.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object.")
    settings: dict[str, Any] = {}
    size = data.get("size")
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        settings["size"] = [size["height"], size["width"]]
    elif isinstance(size, dict) and "shortest_edge" in size:
        settings["size"] = [size["shortest_edge"]] * 2
    elif isinstance(size, int) and not isinstance(size, bool):
        settings["size"] = [size, size]
    if data.get("do_normalize", True):
        for key in ("mean", "std"):
            value = data.get(f"image_{key}")
            if value is not None:
                settings[key] = value
    try:
        Preprocess(**settings)  # check the values now, with the file's name in the message
    except Exception as exc:
        raise ModelError(f"Invalid preprocessing in {path}: {exc}") from exc
    return settings
