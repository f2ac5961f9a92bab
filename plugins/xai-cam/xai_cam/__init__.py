"""CAM: class activation maps (Zhou et al. 2016), as an xai-core plugin.

For a network that ends in global average pooling and one linear layer, ``y = W z + b`` with
``z_k = mean_ij A^k(i,j)``::

    CAM_c(i,j) = sum_k W[c, k] A^k(i,j)        so that    mean_ij CAM_c(i,j) = y_c - b_c

``A`` is the tensor fed into the pooling and ``W[c]`` the classifier row of class ``c``; the bias
is left out because it is the same at every position. One forward pass gives ``A``; every
requested class is one weighted sum of its channels. No gradient is taken.

The pooling may be a module or a function (``x.mean((2, 3))``, ``F.adaptive_avg_pool2d``), so
the feature tensor and the head are found by probing one sample (once per model and input
shape): the head is the last linear layer the forward pass calls whose output is the model's
scores; ``A`` is the output of the last module before it whose spatial mean is the head's
input. When it is the mean of ``ReLU(A)`` instead (DenseNet's ``F.relu(features, inplace=True)``
before pooling), the map uses ``ReLU(A)``, the tensor that really is pooled. Both conditions are
checked again on every batch explained, so a map is never computed on the wrong tensor.

A layer norm over the channels between pooling and head (ConvNeXt, in timm and Hugging Face:
``y = W LN(z) + b``) keeps CAM exact: with ``mu``, ``sigma`` the mean and deviation of ``z`` over
its channels (one number per sample) and ``gamma``, ``beta`` the norm's affine parameters,
``y_c = sum_k W[c,k] gamma_k (z_k - mu) / sigma + const``, so the map is
``sum_k W[c,k] gamma_k (A^k(i,j) - mu) / sigma``, whose spatial mean is again ``y_c`` minus a
constant. Any other layer between (an MLP, a convolution) is refused.

The model is reached only through the ``LayerAccess`` and ``ClassifierHead`` protocols.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import xai_core
from xai_core import Attribution, Capability, Tags, Targets
from xai_core.core.adapters import ClassifierHead, LayerAccess, NormParameters
from xai_core.core.errors import CapabilityError, OptionError, TargetTypeError
from xai_core.core.targets import check_finite_scores

__version__ = "0.1.0"

log = logging.getLogger("xai_core.cam")

USE_GRADCAM = (
    "CAM needs a network that ends in global average pooling followed by one linear layer; "
    "Grad-CAM works at any convolutional layer of any network: use method='gradcam'."
)

Found = tuple[str, str, str | None]  # feature layer, head, layer norm between them (or None)
# (feature layer, head, norm) per model (the adapter's cache_key()), input shape and requested
# head: the probe runs once.
_found: weakref.WeakKeyDictionary[Any, dict[tuple[object, ...], Found]] = (
    weakref.WeakKeyDictionary()
)


class Model(LayerAccess, ClassifierHead, Protocol):
    """What CAM needs of an adapter: both protocols (and ``cache_key()`` of every adapter)."""

    def cache_key(self) -> object: ...


def _classifier(scores: torch.Tensor) -> None:
    """CAM needs class scores ``(N, classes)``; a segmentation head's ``(N, C, *spatial)`` has no
    pooled classifier row to weight the features with."""
    if scores.ndim != 2:
        raise CapabilityError(
            f"CAM does not apply to segmentation outputs (the model returned "
            f"{tuple(scores.shape)}, not (N, classes)): there is no classifier after global "
            f"pooling. Use method='gradcam' (Seg-Grad-CAM) or 'occlusion' with a region target."
        )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding: the model's pooling and ours may sum in different orders."""
    if a.shape != b.shape:
        return False
    tolerance = torch.finfo(b.dtype).eps ** 0.5 * (1 + float(b.abs().max()))
    return bool((a - b).abs().max() <= tolerance)


def channel_norm(model: ClassifierHead, layer: str, channels: int) -> NormParameters | None:
    """The parameters of ``layer`` if it is a layer norm over exactly ``channels`` features."""
    norm = model.norm_parameters(layer)
    return norm if norm is not None and norm.shape == (channels,) else None


def normalize(z: torch.Tensor, norm: NormParameters | None) -> torch.Tensor:
    """``LN(z)`` for ``z`` ``(N, C)`` with ``norm``'s epsilon and affine parameters."""
    if norm is None:
        return z
    return F.layer_norm(z, z.shape[1:], norm.weight, norm.bias, norm.eps)


def pooled_relu(
    features: torch.Tensor, z: torch.Tensor, norm: NormParameters | None = None
) -> bool | None:
    """How ``z`` ``(N, C)`` comes from ``features`` ``(N, C, *spatial)`` by global averaging
    (then ``norm``, if given): ``False`` for the mean of ``features``, ``True`` for the mean of
    ``ReLU(features)``, ``None`` for neither."""
    if features.ndim < 3 or features.shape[:2] != z.shape or features.shape[2:].numel() < 2:
        return None  # a 1x1 map would "match" trivially: it is the pooled vector itself
    spatial = tuple(range(2, features.ndim))
    if _close(normalize(features.mean(spatial), norm), z):
        return False
    if _close(normalize(features.clamp(min=0).mean(spatial), norm), z):
        return True
    return None


def find_head(model: Model, inputs: torch.Tensor, head: str | None = None) -> Found:
    """Names of the layer whose output is globally averaged, of the linear head after it, and
    of a layer norm between them (``None`` when there is none).

    Probes one sample with a hook on every module (all removed afterwards); cached per model,
    input shape and ``head`` (given, or the last linear layer called whose output is the
    model's output), and logged.
    """
    key = (tuple(inputs.shape[1:]), head)
    found = _found.setdefault(model.cache_key(), {})
    if key not in found:
        found[key] = _probe(model, inputs[:1], head)
        log.info("CAM chose layer %r (globally pooled), head %r, norm %r", *found[key])
    return found[key]


def _probe(model: Model, x: torch.Tensor, head: str | None) -> Found:
    linear = [head] if head else model.linear_layers()
    seen = model.record_layers(x, model.layer_names(), inputs_of=linear)
    scores = seen.scores
    check_finite_scores(scores)  # the first forward: NaN scores would read as "no head" below
    _classifier(scores)
    # The head is the last linear layer called whose output is the model's output.
    name = next((n for n, _ in reversed(seen.inputs) if _close(seen.last(n), scores)), None)
    if name is None:
        raise CapabilityError(
            f"No linear layer computes the model's output (none ran, or more layers follow "
            f"the last one). {USE_GRADCAM}"
        )
    z = seen.last_input(name)
    before_head = max(i for i, (n, _) in enumerate(seen.order) if n == name)
    for layer, out in reversed(seen.order[:before_head]):
        if pooled_relu(out, z) is not None:
            return layer, name, None
    # A layer norm whose output is the head's input, and a layer whose pooled output it norms.
    for at in range(before_head - 1, -1, -1):
        norm_name, normed = seen.order[at]
        norm = channel_norm(model, norm_name, z.shape[1])
        if norm is None or not _close(normed.flatten(1), z):
            continue
        for layer, out in reversed(seen.order[:at]):
            if pooled_relu(out, z, norm) is not None:
                return layer, name, norm_name
        break
    raise CapabilityError(
        f"The input of the classifier {name!r} is not the spatial average of any layer's output "
        f"(a hidden layer, attention pooling or flattening comes between). {USE_GRADCAM}"
    )


def _one(model: LayerAccess, spec: Any, what: str) -> str:
    resolved = model.layer_names_of(spec)
    if len(resolved) != 1:
        raise OptionError(f"CAM takes one {what}; got {len(resolved)}.")
    return resolved[0]


class CAM:
    """Class activation maps: the classifier's weights applied to the features it pools."""

    name = "cam"
    tags = Tags(
        "local", "model-specific", requires={Capability.LAYERS, Capability.CLASSIFIER_WEIGHTS}
    )

    def explain(
        self,
        model: Model,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        head: str | nn.Module | None = None,
    ) -> Attribution:
        """:param layer: the layer whose output is globally averaged (name; a PyTorch model also
            takes the module); default: found by probing one sample.
        :param head: the linear classifier (name or module); default: the last linear layer
            the forward pass calls whose output is the model's output.
        """
        if targets.region is not None:
            raise CapabilityError(
                "CAM does not apply to segmentation heads (a Region target); use "
                "method='gradcam' (Seg-Grad-CAM) or 'occlusion'."
            )
        if targets.function is not None:
            raise TargetTypeError(
                "CAM explains class scores through the classifier's weights; a callable target "
                "needs gradients: use method='gradcam'."
            )
        chosen_layer = None if layer is None else _one(model, layer, "layer")
        chosen_head = None if head is None else _one(model, head, "head")
        if chosen_head is not None and chosen_head not in model.linear_layers():
            raise OptionError(
                f"The head must be a linear layer (nn.Linear); {chosen_head!r} is not."
            )
        found_layer, found_head, norm_name = find_head(model, inputs, chosen_head)
        layer_name, head_name = chosen_layer or found_layer, chosen_head or found_head
        norm = None if norm_name is None else model.norm_parameters(norm_name)

        seen = model.record_layers(inputs, [layer_name, head_name], inputs_of=[head_name])
        scores = seen.scores
        _classifier(scores)
        indices = targets.resolve(scores).indices  # (N, K)
        # A layer or head called twice: its last call, the one nearest the output.
        features, z = seen.last(layer_name), seen.last_input(head_name)
        if not _close(seen.last(head_name), scores):
            raise CapabilityError(
                f"The output of {head_name!r} is not the model's output. {USE_GRADCAM}"
            )
        relu = pooled_relu(features, z, norm)
        if relu is None:
            normed = f"normed by {norm_name!r}, " if norm is not None else ""
            raise CapabilityError(
                f"The input of {head_name!r} is not the spatial average of the output of "
                f"{layer_name!r} {tuple(features.shape)} nor of its ReLU ({normed}or not). "
                f"{USE_GRADCAM}"
            )
        if relu:
            features = features.clamp(min=0)
        weights = model.linear_weights(head_name)[0][indices]  # (N, K, C): each target's row
        if norm is not None:  # see the module docstring: W gamma (A - mu) / sigma
            pooled = features.mean(tuple(range(2, features.ndim)))
            var, mu = torch.var_mean(pooled, dim=1, unbiased=False)
            if norm.weight is not None:
                weights = weights * norm.weight
            weights = weights / (var + norm.eps).sqrt()[:, None, None]
            features = features - mu.view(-1, *[1] * (features.ndim - 1))
        cam = torch.einsum("nkc,nc...->nk...", weights, features)
        return Attribution(
            maps=[cam],
            scores=scores,
            layers=[layer_name],
            details={"head": head_name, "relu": relu, **({"norm": norm_name} if norm else {})},
        )


@xai_core.hookimpl
def register_explainers(register):
    register(CAM)
