"""Every exception xai-core raises on purpose lives here.

Each error says what was wrong and what to do about it. Errors that stand for a wrong *kind* of
value also derive from :class:`TypeError`; errors for a wrong *value* derive from
:class:`ValueError`, so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches


class XaiError(Exception):
    """Base class of every error raised by xai-core and its plugins."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix for an unknown name, or '' when nothing is close."""
    close = get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class InputError(XaiError, ValueError):
    """The input batch is unusable: wrong rank, channels, size, emptiness or non-finite values."""


class InputTypeError(XaiError, TypeError):
    """The input is not a floating-point torch tensor."""


class DeviceError(XaiError, ValueError):
    """Inputs and model live on different devices."""


class TargetError(XaiError, ValueError):
    """Targets do not match the batch: wrong count, out of range, or a bad callable result."""


class TargetTypeError(XaiError, TypeError):
    """Targets are of a type xai-core cannot interpret."""


class UnknownMethodError(XaiError, LookupError):
    """No installed plugin provides an explainer (or metric) of that name."""


class UnknownOptionError(XaiError, TypeError):
    """An option was passed that the explainer does not accept."""


class OptionError(XaiError, ValueError):
    """An option has a value the explainer cannot use."""


class CapabilityError(XaiError, TypeError):
    """The model cannot provide what the explainer needs (e.g. gradients from an ONNX file)."""


class LayerNotFoundError(XaiError, ValueError):
    """A layer name does not exist in the model."""


class LayerTypeError(XaiError, TypeError):
    """A layer was given as something other than a name, a module or a list of those."""


class ModelError(XaiError, ValueError):
    """The model cannot be adapted, loaded or run."""


class ModelRunError(ModelError, RuntimeError):
    """The model itself raised on the inputs (its error is the ``__cause__``): a typed error
    naming the inputs' shape, and still a ``RuntimeError`` for code that catches torch's."""


class ModelTypeError(XaiError, TypeError):
    """No adapter (built-in or from a plugin) accepts this kind of model object."""


class PluginError(XaiError):
    """A plugin is broken: it failed to import, to register, or two plugins claim one name."""


class PluginConflictError(PluginError, LookupError):
    """Two plugins registered the same name; neither is used until one is removed."""


class TagError(XaiError, ValueError):
    """An explainer declares a tag value that does not exist."""


class ConformanceError(XaiError, AssertionError):
    """Raised by :mod:`xai_core.testing` when an explainer breaks the protocol."""


class InputFileError(XaiError, ValueError):
    """An input file cannot be read: missing, corrupt, or of a kind xai-core does not read.

    ``path`` and ``reason`` are kept apart so that a batch job can report the file and go on.
    """

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"Cannot read {path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep it picklable (multiprocessing) despite the two-argument init
        return (type(self), (self.path, self.reason))


class OutputFileError(XaiError, OSError):
    """An output file is missing or cannot be written where a run expects it."""


class InputTooLargeError(InputFileError):
    """An input file declares more decoded data than the input size limit allows.

    Raised from the header, before anything is decoded, so a small compressed file that would
    inflate to gigabytes (a decompression bomb) costs nothing. ``declared_bytes`` and
    ``limit_bytes`` say by how much; see :mod:`xai_core.io.limits` for raising the limit.
    """

    def __init__(self, path: object, reason: str, declared_bytes: int = 0, limit_bytes: int = 0):
        super().__init__(path, reason)
        self.declared_bytes = declared_bytes
        self.limit_bytes = limit_bytes

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.declared_bytes, self.limit_bytes))


class MissingDependencyError(XaiError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""


class PluginContractError(PluginError):
    """A plugin's explainer or metric returned a result that breaks the documented contract
    (docs/conventions.md): wrong shape, dtype, device, non-finite values. A bug in the plugin."""
class NonFiniteScoresError(ModelError):
    """The model's scores on the unperturbed batch contain NaN or infinite values."""


class OptionTypeError(OptionError, TypeError):
    """An option (or an argument of ``explain``) is of the wrong type."""


class InputMismatchError(InputError):
    """Inputs that do not fit the model, fixed differently from Python and from the command
    line. ``facts`` says what is wrong, ``python_hint`` what to do in Python; ``str()`` is both.
    The command line prints ``facts`` with its own flag (``xai_core.cli`` maps each subclass to
    one), so neither interface gives the other's advice. Subclasses carry what the hint needs."""

    def __init__(self, facts: str, python_hint: str = "", **details: object) -> None:
        super().__init__(f"{facts} {python_hint}".strip())
        self.facts, self.python_hint, self.details = facts, python_hint, details

    def __reduce__(self):
        return (_rebuild_mismatch, (type(self), self.facts, self.python_hint, self.details))


def _rebuild_mismatch(cls, facts, python_hint, details):
    return cls(facts, python_hint, **details)


class ChannelMismatchError(InputMismatchError):
    """The inputs have another number of channels than the model takes (``details``:
    ``expected``, ``got``)."""


class SpatialSizeError(InputMismatchError):
    """The model takes one fixed spatial size and the inputs have another (``details``:
    ``expected``, ``got``)."""


class InputRankError(InputMismatchError):
    """2D inputs to a 3D model or volumes to a 2D model (``details``: ``expected`` and ``got``,
    the number of dimensions of a batch: 4 or 5)."""


class UnknownLayerError(LayerNotFoundError):
    """A layer name the model does not have; ``facts`` and ``python_hint`` as in
    :class:`InputMismatchError` (the command line says how to list the layers)."""

    def __init__(self, facts: str, python_hint: str = "") -> None:
        super().__init__(f"{facts} {python_hint}".strip())
        self.facts, self.python_hint = facts, python_hint

    def __reduce__(self):
        return (type(self), (self.facts, self.python_hint))


class AdapterProtocolError(CapabilityError):
    """An adapter declares a capability but lacks the methods of its protocol
    (``xai_core.core.adapters``); ``missing`` maps each protocol's name to its missing methods."""

    def __init__(self, message: str, missing: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.missing = dict(missing or {})

    def __reduce__(self):
        return (type(self), (str(self), self.missing))


class ExecutorError(XaiError, RuntimeError):
    """An executor lost work it could not redo, e.g. a worker process that died more often than
    its retries allow; the message says what was lost and which setting allows more retries."""


class UnsupportedOperatorError(CapabilityError):
    """A gradient through an ONNX graph met an operator the ONNX adapter cannot differentiate
    (``operator``: its ``op_type``; ``node``: the node's name)."""

    def __init__(self, message: str, operator: str = "", node: str = "") -> None:
        super().__init__(message)
        self.operator, self.node = operator, node

    def __reduce__(self):
        return (type(self), (str(self), self.operator, self.node))
