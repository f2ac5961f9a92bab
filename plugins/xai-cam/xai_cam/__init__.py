"""CAM: class activation maps (Zhou et al. 2016), as an xai-core plugin.

For a network that ends in global average pooling and one linear layer, ``y = W z + b`` with
``z_k = mean_ij A^k(i,j)``::

    CAM_c(i,j) = sum_k W[c, k] A^k(i,j)        so that    mean_ij CAM_c(i,j) = y_c - b_c

``A`` is the tensor fed into the pooling and ``W[c]`` the classifier row of class ``c``; the bias
is left out because it is the same at every position. One forward pass gives ``A``; every
requested class is one weighted sum of its channels. No gradient is taken.

The pooling may be a module or a function (``x.mean((2, 3))``, ``F.adaptive_avg_pool2d``), so
the feature tensor and the head are found by probing one sample (once per model and input
shape): the head is the last ``nn.Linear`` the forward pass calls whose output is the model's
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
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import xai_core
from xai_core import Attribution, Capability, Tags, Targets
from xai_core.core.adapters import ModelAdapter
from xai_core.core.errors import CapabilityError, OptionError, TargetTypeError
from xai_core.core.targets import check_finite_scores
from xai_core.torch.adapter import TorchAdapter
from xai_core.torch.capture import capture

__version__ = "0.1.0"

log = logging.getLogger("xai_core.cam")

USE_GRADCAM = (
    "CAM needs a network that ends in global average pooling followed by one linear layer; "
    "Grad-CAM works at any convolutional layer of any network: use method='gradcam'."
)

Found = tuple[str, str, str | None]  # feature layer, head, layer norm between them (or None)
# (feature layer, head, norm) per model, input shape and requested head: the probe runs once.
_found: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], Found]] = (
    weakref.WeakKeyDictionary()
)


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


def channel_norm(module: nn.Module | None, channels: int) -> nn.Module | None:
    """``module`` if it is a layer norm over exactly ``channels`` features (``nn.LayerNorm``
    and its subclasses such as timm's ``LayerNorm2d``, or anything with the same attributes)."""
    shape = getattr(module, "normalized_shape", None)
    if module is None or shape is None or tuple(shape) != (channels,):
        return None
    return module if isinstance(getattr(module, "eps", None), float) else None


def normalize(z: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """``LN(z)`` for ``z`` ``(N, C)`` with ``norm``'s epsilon and affine parameters."""
    if norm is None:
        return z
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return F.layer_norm(z, z.shape[1:], weight, bias, norm.eps)


def pooled_relu(
    features: torch.Tensor, z: torch.Tensor, norm: nn.Module | None = None
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


def find_head(
    model: TorchAdapter, inputs: torch.Tensor, head: tuple[str, nn.Module] | None = None
) -> Found:
    """Names of the layer whose output is globally averaged, of the linear head after it, and
    of a layer norm between them (``None`` when there is none).

    Probes one sample with a hook on every module (all removed afterwards); cached per model,
    input shape and ``head`` (given, or the last ``nn.Linear`` called whose output is the
    model's output), and logged.
    """
    key = (tuple(inputs.shape[1:]), None if head is None else head[0])
    found = _found.setdefault(model.module, {})
    if key not in found:
        found[key] = _probe(model, inputs[:1], head)
        log.info("CAM chose layer %r (globally pooled), head %r, norm %r", *found[key])
    return found[key]


def _probe(model: TorchAdapter, x: torch.Tensor, head: tuple[str, nn.Module] | None) -> Found:
    layers = model.named_layers()
    linear = dict([head]) if head else {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    with (
        torch.no_grad(),
        capture(layers, detach=True, strict=False) as seen,
        capture(linear, inputs=True) as fed,
    ):
        scores = model.forward(x)
    check_finite_scores(scores)  # the first forward: NaN scores would read as "no head" below
    _classifier(scores)
    # The head is the last linear layer called whose output is the model's output.
    name = next((n for n, _ in reversed(fed.order) if _close(seen.last(n), scores)), None)
    if name is None:
        raise CapabilityError(
            f"No linear layer computes the model's output (none ran, or more layers follow "
            f"the last one). {USE_GRADCAM}"
        )
    z = fed.last(name)
    before_head = max(i for i, (n, _) in enumerate(seen.order) if n == name)
    for layer, out in reversed(seen.order[:before_head]):
        if pooled_relu(out, z) is not None:
            return layer, name, None
    # A layer norm whose output is the head's input, and a layer whose pooled output it norms.
    for at in range(before_head - 1, -1, -1):
        norm_name, normed = seen.order[at]
        norm = channel_norm(layers.get(norm_name), z.shape[1])
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


def _one(model: TorchAdapter, spec: str | nn.Module, what: str) -> tuple[str, nn.Module]:
    resolved = model.resolve_layers(spec)
    if len(resolved) != 1:
        raise OptionError(f"CAM takes one {what}; got {len(resolved)}.")
    return next(iter(resolved.items()))


class CAM:
    """Class activation maps: the classifier's weights applied to the features it pools."""

    name = "cam"
    tags = Tags(
        "local", "model-specific", requires={Capability.LAYERS, Capability.CLASSIFIER_WEIGHTS}
    )

    @classmethod
    def unsupported_reason(cls, model: ModelAdapter) -> str | None:
        if not isinstance(model, TorchAdapter):
            return f"cam reads the layers and weights of a PyTorch module, not a {model.kind} model"
        return None

    def explain(
        self,
        model: TorchAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        head: str | nn.Module | None = None,
    ) -> Attribution:
        """:param layer: the layer whose output is globally averaged (name or module); default:
            found by probing one sample.
        :param head: the linear classifier (name or module); default: the last ``nn.Linear``
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
        if chosen_head is not None and not isinstance(chosen_head[1], nn.Linear):
            raise OptionError(
                f"The head must be an nn.Linear; {chosen_head[0]!r} is a "
                f"{type(chosen_head[1]).__name__}."
            )
        named = model.named_layers()
        found_layer, found_head, norm_name = find_head(model, inputs, chosen_head)
        chosen_layer = chosen_layer or (found_layer, named[found_layer])
        chosen_head = chosen_head or (found_head, named[found_head])
        (layer_name, layer_module), (head_name, head_module) = chosen_layer, chosen_head
        norm = None if norm_name is None else named[norm_name]

        with (
            torch.no_grad(),
            capture({layer_name: layer_module, head_name: head_module}, detach=True) as seen,
            capture({head_name: head_module}, inputs=True) as fed,
        ):
            scores = model.forward(inputs)
        _classifier(scores)
        indices = targets.resolve(scores).indices  # (N, K)
        # A layer or head called twice: its last call, the one nearest the output.
        features, z = seen.last(layer_name), fed.last(head_name)
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
        weights = head_module.weight[indices]  # (N, K, C): the classifier row of each target
        if norm is not None:  # see the module docstring: W gamma (A - mu) / sigma
            pooled = features.mean(tuple(range(2, features.ndim)))
            var, mu = torch.var_mean(pooled, dim=1, unbiased=False)
            if getattr(norm, "weight", None) is not None:
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
