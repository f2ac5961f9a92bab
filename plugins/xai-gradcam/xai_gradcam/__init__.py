"""Grad-CAM (Selvaraju et al. 2017) and two published weightings, as one xai-core plugin.

For a layer with activations ``A`` (channels ``k``) and a target score ``y`` (a logit)::

    g       = dy/dA
    gradcam:    alpha_k = mean_ij g_k(i,j)
    guided:     alpha_k = mean_ij [A_k>0][g_k>0] g_k(i,j)        (Keras/TF tutorials' masking)
    gradcam++:  a_k(i,j) = g^2 / (2 g^2 + sum_ab A_k(a,b) g^3),  alpha_k = sum_ij a_k(i,j) ReLU(g)
    map     = ReLU(sum_k alpha_k A_k)

Grad-CAM++ is eq. 19 of Chattopadhyay et al. (2018) under the paper's exponential-score
assumption (``Y = exp(S)``), which turns the higher derivatives into powers of the first; it is
the form of the authors' code and of the common libraries, so maps are comparable.

Several layers share one forward pass; several targets share it too, each with one backward pass
(:meth:`xai_core.core.adapters.LayerGradients.layer_gradients`; for PyTorch through the retained
graph, :func:`xai_core.torch.ops.target_gradients` says why not one vmapped backward). The model
is reached only through the ``LayerAccess`` and ``LayerGradients`` protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from torch import nn

import xai_core
from xai_core import Attribution, Capability, Tags, Targets
from xai_core.core.adapters import LayerAccess, LayerGradients
from xai_core.core.errors import CapabilityError, LayerTypeError, OptionError
from xai_core.torch.ops import Layout, as_feature_map, feature_layout

__version__ = "0.1.0"

VARIANTS = ("gradcam", "guided", "gradcam++")


def channel_weights(variant: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``alpha`` ``(K, N, C)`` from activations ``(N, C, *s)`` and gradients ``(K, N, C, *s)``."""
    spatial = tuple(range(3, grads.ndim))
    if variant == "gradcam":
        return grads.mean(dim=spatial)
    if variant == "guided":
        return (grads * ((acts > 0) & (grads > 0))).mean(dim=spatial)
    # gradcam++
    g2, g3 = grads.pow(2), grads.pow(3)
    denominator = 2 * g2 + acts.sum(dim=tuple(range(2, acts.ndim)), keepdim=True) * g3
    alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return (alpha * grads.clamp(min=0)).sum(dim=spatial)


def feature_layout_of(
    name: str, output: torch.Tensor, inputs: torch.Tensor, class_token: bool | int | None
) -> Layout:
    """How a layer's output becomes a feature map ``(N, C, *spatial)``: as it is, channels-last
    moved first, or tokens ``(N, T, C)`` of a batch-first transformer laid out on their patch
    grid (:func:`xai_core.torch.ops.feature_layout`)."""
    if output.ndim not in (inputs.ndim, 3) or output.shape[0] != inputs.shape[0]:
        raise LayerTypeError(
            f"Layer {name!r} outputs shape {tuple(output.shape)}, neither a feature map "
            f"(N, C, *spatial) like the inputs {tuple(inputs.shape)} nor tokens (N, T, C); choose "
            f"a convolutional layer, or a transformer block's."
        )
    try:
        return feature_layout(output.shape, inputs.shape[2:], class_token)
    except CapabilityError as error:
        message = f"Layer {name!r} outputs tokens {tuple(output.shape)}: {error}"
        raise LayerTypeError(message) from error


def _not_on_path(layer: str) -> OptionError:
    return OptionError(
        f"The target scores do not depend on the output of layer {layer!r} (its last call): "
        f"choose a layer on the path from the input to the scores."
    )


class Model(LayerAccess, LayerGradients, Protocol):
    """What Grad-CAM needs of an adapter: both protocols."""


class GradCAM:
    """Gradient-weighted class activation maps at one or several layers."""

    name = "gradcam"
    tags = Tags("local", "model-specific", requires={Capability.GRADIENTS, Capability.LAYERS})

    def explain(
        self,
        model: Model,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        layers: Sequence[str | nn.Module] | None = None,
        variant: Literal["gradcam", "guided", "gradcam++"] = "gradcam",
        relu: bool = True,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param layer: one layer (name; a PyTorch model also takes the module); default: the
            last with a spatial output, or on a transformer the tokens entering the last
            attention (after it only the class token reaches the head). Token layers
            ``(N, T, C)`` are laid out on their patch grid.
        :param layers: several layers, explained from the same forward and backward pass.
        :param variant: ``"gradcam"``, ``"guided"`` or ``"gradcam++"``.
        :param relu: apply the final ReLU (``False`` keeps negative evidence visible).
        :param class_token: for token layers, token 0 is a class token (dropped, with any
            register/distillation tokens after it), or an ``int`` count of them; ``None``
            decides from the token count.
        """
        if variant not in VARIANTS:
            raise OptionError(f"variant must be one of {VARIANTS}; got {variant!r}.")
        if layer is not None and layers is not None:
            raise OptionError("Give either `layer` or `layers`, not both.")
        if layers is None and layer is None:
            layer = model.default_layer(inputs)
        hooked = model.layer_names_of(layers if layers is not None else layer)
        run = model.layer_gradients(inputs, hooked, targets)
        acts = [run.activations[name] for name in hooked]  # a layer used twice: its last call
        if class_token is None:
            class_token = model.extra_tokens()
        grids = [
            feature_layout_of(name, a, inputs, class_token)
            for name, a in zip(hooked, acts, strict=True)
        ]
        features = [as_feature_map(a, g) for a, g in zip(acts, grids, strict=True)]
        weights: list[list[torch.Tensor]] = [[] for _ in acts]  # per layer, (1, N, C) per target
        for grads in run.gradients:
            for name, f, grid, alphas in zip(hooked, features, grids, weights, strict=True):
                g = grads[name]
                if g is None:
                    raise _not_on_path(name)
                alphas.append(channel_weights(variant, f, as_feature_map(g, grid).unsqueeze(0)))
        maps = []
        for f, alphas in zip(features, weights, strict=True):
            cam = torch.einsum("knc,nc...->nk...", torch.cat(alphas), f)  # alphas: (K, N, C)
            maps.append(cam.clamp(min=0) if relu else cam)
        calls = dict(run.calls)
        return Attribution(
            maps=maps,
            scores=run.scores,
            layers=list(hooked),
            details={
                "variant": variant,
                "calls": calls,
                "multi_layer": layers is not None,
                "token_layers": {
                    n: (g.extra, g.grid) for n, g in zip(hooked, grids, strict=True)
                    if g.kind == "tokens"
                },
                "layouts": {n: g.kind for n, g in zip(hooked, grids, strict=True)},
            },
        )


@xai_core.hookimpl
def register_explainers(register):
    register(GradCAM)
