"""Every hook a plugin can implement, in one place.

A plugin is a module (or object) that the ``xai_core`` entry-point group points to and that
implements some of these hooks with the :data:`hookimpl` marker::

    # pyproject.toml
    [project.entry-points.xai_core]
    my_method = "my_package.plugin"

    # my_package/plugin.py
    import xai_core

    @xai_core.hookimpl
    def register_explainers(register):
        register(MyExplainer)

An implementation may accept fewer arguments than its spec names, so specs can grow new
arguments without breaking plugins. Each plugin's implementation is called on its own, inside a
guard: one plugin raising never stops the others (see :mod:`xai_core.core.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from xai_core.core.adapters import ModelAdapter

PROJECT = "xai_core"  # the pluggy project name and the entry-point group

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- called once, when the registry first loads plugins --------------------------------------


@hookspec
def register_explainers(register: Callable[[type], None]) -> None:
    """Register explainer classes by calling ``register(ExplainerClass)`` once per class.

    :param register: records the class under its ``name`` together with the distribution and
        version of the plugin that called it. A class that breaks the
        :class:`~xai_core.Explainer` protocol is refused and reported as a plugin failure. A
        name a built-in distribution registers stays the built-in's (your class is refused);
        two third-party plugins registering one name make it unusable until one is removed, and
        the error names both distributions. Nothing is kept if the hook raises. What
        ``explain`` returns is checked against the result contract on every call
        (:mod:`xai_core.core.contract`).
    """


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register metric classes by calling ``register(MetricClass)`` once per class.

    :param register: same contract as in :func:`register_explainers`; a metric class has a
        ``name`` attribute.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add sub-commands to the ``xai`` command line.

    :param cli: a :class:`typer.Typer` application of your own; call ``@cli.command()`` (or
        ``cli.add_typer(...)``) on it. Called once, when ``xai`` starts; the core then adds your
        commands to ``xai`` one by one. A name ``xai`` already has (a built-in command such as
        ``plugins``, or another plugin's) is refused and listed by ``xai plugins`` as a failure;
        if the hook raises, none of its commands is added.
    """


# -- called for every model passed to explain() / compare() ----------------------------------


@hookspec
def adapt_model(model: Any, options: dict[str, Any]) -> ModelAdapter | None:
    """Turn a model object the core does not know into a :class:`~xai_core.ModelAdapter`.

    Return ``None`` for objects you do not handle. Plugins are asked only for objects the core
    does not adapt itself (anything but a ``torch.nn.Module``, an ONNX model or a
    ``ModelAdapter``), in pluggy's order, each in its own guard (the registry iterates the
    implementations itself, so this is not a pluggy ``firstresult`` hook); the first
    ``ModelAdapter`` returned wins. To adapt a
    PyTorch module differently, users pass your adapter instance as the model. Raise an
    :class:`~xai_core.core.errors.XaiError` for a model you recognise but cannot use:
    it is shown if no
    other plugin adapts the model. Any other exception, or a result that is not a
    ``ModelAdapter``, is recorded as your plugin's failure and the next plugin is asked. The
    first line of your implementation's docstring is shown by ``xai plugins``.

    :param model: whatever the user passed as ``model``.
    :param options: adapter options given by the user (e.g. ``providers`` for ONNX).
    """


# -- extension points of the file layer and of dataset work ----------------------------------


@hookspec
def load_model(spec: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """Load the model a command-line ``spec`` names: ``(model, info)``, or ``None``.

    The core's own loaders (``demo:``, Hugging Face folders, ONNX, TorchScript, timm and
    torchvision state_dicts; :mod:`xai_core.io.models`) are asked first and claim ``demo:``
    specs and every path that exists. Plugins are asked, in pluggy's order, only for the other
    specs, typically with a prefix of their own (``myplugin:NAME``); the first ``(model, info)``
    returned wins. Raise an :class:`~xai_core.core.errors.XaiError` for a spec you recognise but
    cannot load: it is shown if no other plugin loads it. Any other exception, or a result that
    is not a ``(model, dict)`` pair, is recorded as your plugin's failure and the next plugin is
    asked. Model files are untrusted: never unpickle them (``torch.load(weights_only=True)`` only).

    :param spec: what the user gave as the model (``xai explain SPEC ...``).
    :param options: ``arch`` and ``num_classes`` as given on the command line (or ``None``).
    :returns: the model (anything :func:`xai_core.explain` accepts) and a dict describing it:
        ``kind`` (defaults to your plugin's name), optionally ``class_names`` and ``preprocess``
        (defaults for :class:`~xai_core.io.Preprocess`: ``size``, ``mean``, ``std``, ``channels``).
    """


@hookspec
def register_readers(register: Callable[[Any], None]) -> None:
    """Register input readers by calling ``register(reader)`` (a class or an instance).

    A reader has a ``name`` (a lower-case identifier, the inputs' ``kind``), a cheap
    ``claims(path) -> bool`` that classifies a file without decoding it, and
    ``read(path, options) -> LoadedInput`` (:class:`~xai_core.io.inputs.LoadedInput`; ``options``
    is a :class:`~xai_core.io.readers.ReadOptions` carrying the input size limit, which the
    reader must check from the file's header before decoding, e.g. with
    ``options.check_size(path, shape, itemsize)``). The core's PNG/JPEG, DICOM and NIfTI readers
    are asked first; plugin readers only for files none of them claims. A reader whose
    ``claims`` raises is recorded as a failure and treated as not claiming; one whose ``read``
    raises makes that file fail (an ``InputFileError``), never the batch.
    """


@hookspec
def register_executors(register: Callable[[Any], None]) -> None:
    """Register executors of dataset work by calling ``register(ExecutorClass)``.

    An executor (:class:`~xai_core.core.executors.Executor`) has a ``name`` (what users pass as
    ``engine=``), ``map(step, batches)`` yielding ``step(batch)`` for every batch, and
    ``reduce(parts)`` merging those partial results with ``+``. The core's ``local`` executor
    (one process, in order) is the default; a name the core uses cannot be taken over.
    """
