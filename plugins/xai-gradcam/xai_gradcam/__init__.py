"""Grad-CAM (Selvaraju et al. 2017), two published weightings, and the rest of the CAM family
(HiResCAM, XGrad-CAM, LayerCAM, EigenCAM, Score-CAM, Ablation-CAM, Recipro-CAM:
docs/methods/cam-family.md), as one xai-core plugin.

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
is reached only through the ``LayerAccess`` and ``LayerGradients`` protocols (EigenCAM and
Score-CAM: ``LayerAccess`` and forward passes only; Ablation-CAM and Recipro-CAM:
``LayerAccess`` and ``LayerOutputEditing``, the layer's output edited in batched copies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import xai_core
from xai_core import Attribution, Capability, Tags, Targets
from xai_core.core.adapters import LayerAccess, LayerGradients, LayerOutputEditing
from xai_core.core.errors import CapabilityError, LayerTypeError, OptionError
from xai_core.core.options import PositiveInt
from xai_core.core.targets import ResolvedTargets
from xai_core.torch.ops import Layout, as_feature_map, evaluate_in_chunks, feature_layout

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
    """What the gradient-weighted CAMs need of an adapter: both protocols."""


def _layers_asked(
    model: LayerAccess,
    inputs: torch.Tensor,
    layer: str | nn.Module | None,
    layers: Sequence[str | nn.Module] | None,
) -> list[str]:
    if layer is not None and layers is not None:
        raise OptionError("Give either `layer` or `layers`, not both.")
    if layers is None and layer is None:
        layer = model.default_layer(inputs)
    return model.layer_names_of(layers if layers is not None else layer)


def _layouts(
    model: LayerAccess,
    inputs: torch.Tensor,
    hooked: list[str],
    acts: list[torch.Tensor],
    class_token: bool | int | None,
) -> list[Layout]:
    """How each layer's output becomes a feature map (:func:`feature_layout_of`)."""
    if class_token is None:
        class_token = model.extra_tokens()
    return [
        feature_layout_of(name, a, inputs, class_token)
        for name, a in zip(hooked, acts, strict=True)
    ]


def _attribution(
    hooked: list[str],
    maps: list[torch.Tensor],
    scores: torch.Tensor,
    calls: dict[str, int],
    grids: list[Layout],
    multi_layer: bool,
    relu: bool,
    **details: object,
) -> Attribution:
    return Attribution(
        maps=[m.clamp(min=0) if relu else m for m in maps],
        scores=scores,
        layers=list(hooked),
        details={
            **details,
            "calls": calls,
            "multi_layer": multi_layer,
            "token_layers": {
                n: (g.extra, g.grid) for n, g in zip(hooked, grids, strict=True)
                if g.kind == "tokens"
            },
            "layouts": {n: g.kind for n, g in zip(hooked, grids, strict=True)},
        },
    )


class GradientWeightedCAM:
    """The shared path of the gradient-weighted CAMs: one forward pass recording the layers, one
    backward pass per target, and :meth:`combine` of each layer's feature map ``A`` ``(N, C, *s)``
    with the gradient ``g = dy/dA`` of one target into that target's map ``(N, *s)``."""

    name = "gradient-weighted-cam"  # overridden by every registered subclass
    tags = Tags("local", "model-specific", requires={Capability.GRADIENTS, Capability.LAYERS})

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def details(self) -> dict[str, object]:
        return {}

    def explain(
        self,
        model: Model,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        layers: Sequence[str | nn.Module] | None = None,
        relu: bool = True,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param layer: one layer (name; a PyTorch model also takes the module); default: the
            last with a spatial output, or on a transformer the tokens entering the last
            attention (after it only the class token reaches the head). Token layers
            ``(N, T, C)`` are laid out on their patch grid.
        :param layers: several layers, explained from the same forward and backward pass.
        :param relu: apply the final ReLU (``False`` keeps negative evidence visible).
        :param class_token: for token layers, token 0 is a class token (dropped, with any
            register/distillation tokens after it), or an ``int`` count of them; ``None``
            decides from the token count.
        """
        hooked = _layers_asked(model, inputs, layer, layers)
        run = model.layer_gradients(inputs, hooked, targets)
        acts = [run.activations[name] for name in hooked]  # a layer used twice: its last call
        grids = _layouts(model, inputs, hooked, acts, class_token)
        features = [as_feature_map(a, g) for a, g in zip(acts, grids, strict=True)]
        per_target: list[list[torch.Tensor]] = [[] for _ in acts]  # per layer, (N, *s) per target
        for grads in run.gradients:
            for name, f, grid, cams in zip(hooked, features, grids, per_target, strict=True):
                g = grads[name]
                if g is None:
                    raise _not_on_path(name)
                cams.append(self.combine(f, as_feature_map(g, grid)))
        maps = [torch.stack(cams, dim=1) for cams in per_target]
        return _attribution(
            hooked, maps, run.scores, dict(run.calls), grids,
            layers is not None, relu, **self.details(),
        )


class GradCAM(GradientWeightedCAM):
    """Gradient-weighted class activation maps at one or several layers."""

    name = "gradcam"

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
        """:param variant: ``"gradcam"``, ``"guided"`` or ``"gradcam++"``; the other options
        as :meth:`GradientWeightedCAM.explain`."""
        if variant not in VARIANTS:
            raise OptionError(f"variant must be one of {VARIANTS}; got {variant!r}.")
        self.variant = variant
        return super().explain(
            model, inputs, targets, layer=layer, layers=layers, relu=relu, class_token=class_token
        )

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        alpha = channel_weights(self.variant, acts, grads.unsqueeze(0))[0]  # (N, C)
        return torch.einsum("nc,nc...->n...", alpha, acts)

    def details(self) -> dict[str, object]:
        return {"variant": self.variant}


class HiResCAM(GradientWeightedCAM):
    """HiResCAM (Draelos and Carin 2020): ``sum_k g_k * A_k``, the gradient kept per position
    (no spatial averaging), so the map is the exact contribution of each position to
    ``sum_k <g_k, A_k>``."""

    name = "hirescam"

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return (grads * acts).sum(dim=1)


class XGradCAM(GradientWeightedCAM):
    """XGrad-CAM (Fu et al. 2020): ``alpha_k = sum_ij g_k A_k / sum_ij A_k``; a channel whose
    activations sum to exactly zero gets weight 0 (pytorch-grad-cam adds ``1e-7`` instead)."""

    name = "xgradcam"

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, acts.ndim))
        total = acts.sum(dim=spatial)
        alpha = (grads * acts).sum(dim=spatial) / torch.where(total != 0, total, 1.0)
        return torch.einsum("nc,nc...->n...", alpha * (total != 0), acts)


class LayerCAM(GradientWeightedCAM):
    """LayerCAM (Jiang et al. 2021): ``sum_k ReLU(g_k) * A_k``, each position weighted by its
    own positive gradient."""

    name = "layercam"

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return (grads.clamp(min=0) * acts).sum(dim=1)


def first_component_projection(acts: torch.Tensor) -> torch.Tensor:
    """Each sample's positions ``(Z, C)``, centred over positions, projected on their first
    principal direction: ``(N, *s)``. SVD leaves the sign free; it is fixed so that the
    projection's largest magnitude is positive (flipped when ``|min| > |max|``, the sign
    correction of pytorch-grad-cam's ``get_2d_projection_with_sign_correction``)."""
    positions = acts.flatten(2).transpose(1, 2)  # (N, Z, C)
    centred = positions - positions.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # batched over samples
    projection = centred @ vh[:, 0, :, None]  # (N, Z, 1)
    flip = projection.amin(dim=(1, 2)).abs() > projection.amax(dim=(1, 2)).abs()
    projection = torch.where(flip[:, None, None], -projection, projection)
    return projection.reshape(acts.shape[:1] + acts.shape[2:])


class EigenCAM:
    """EigenCAM (Muhammad and Yeasin 2020): the activations' projection on their first
    principal component. No gradients and no class: every target gets the same map."""

    name = "eigencam"
    tags = Tags("local", "model-specific", requires={Capability.LAYERS})

    def explain(
        self,
        model: LayerAccess,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        layers: Sequence[str | nn.Module] | None = None,
        relu: bool = True,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """Options as Grad-CAM's (:meth:`GradientWeightedCAM.explain`)."""
        hooked = _layers_asked(model, inputs, layer, layers)
        record = model.record_layers(inputs, hooked)
        count = targets.resolve(record.scores).count
        acts = [record.last(name) for name in hooked]
        grids = _layouts(model, inputs, hooked, acts, class_token)
        maps = []
        for a, grid in zip(acts, grids, strict=True):
            f = as_feature_map(a, grid)
            # SVD needs at least single precision; float64 stays float64
            p = first_component_projection(f.to(torch.promote_types(f.dtype, torch.float32)))
            maps.append(p.to(f.dtype).unsqueeze(1).expand(-1, count, *p.shape[1:]).contiguous())
        return _attribution(
            hooked, maps, record.scores,
            {name: record.calls(name) for name in hooked}, grids, layers is not None, relu,
        )


class ScoreCAM:
    """Score-CAM (Wang et al. 2020): each channel ``A_k``, upsampled to the input and min-max
    normalised to a mask ``H_k``, is weighted by the target's score on the masked input
    ``X * H_k``; every sample's ``C`` masked copies go through the model in batches of
    ``batch_size`` (masks built per batch, so memory is bounded by it)."""

    name = "scorecam"
    tags = Tags("local", "model-specific", requires={Capability.LAYERS})

    def explain(
        self,
        model: LayerAccess,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        layers: Sequence[str | nn.Module] | None = None,
        weights: Literal["softmax", "probability", "increase"] = "softmax",
        batch_size: PositiveInt = 64,
        relu: bool = True,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param weights: ``"softmax"``: ``alpha_k`` = softmax over channels of the target's
            logit on ``X * H_k`` (pytorch-grad-cam); ``"probability"``: the target's softmax
            probability on ``X * H_k`` (the authors' code); ``"increase"``: that probability
            minus the target's probability on a zero baseline ``X_b`` (the paper's increase of
            confidence).
        :param batch_size: masked inputs per forward pass.
        The other options as :meth:`GradientWeightedCAM.explain`."""
        hooked = _layers_asked(model, inputs, layer, layers)
        record = model.record_layers(inputs, hooked)
        resolved = targets.resolve(record.scores)
        acts = [record.last(name) for name in hooked]
        grids = _layouts(model, inputs, hooked, acts, class_token)
        maps = []
        for a, grid in zip(acts, grids, strict=True):
            f = as_feature_map(a, grid)
            scores = self.masked_scores(model, inputs, f, resolved, weights, batch_size)
            alpha = scores.softmax(dim=1) if weights == "softmax" else scores  # (N, C, K)
            if weights == "increase":
                with torch.no_grad():
                    baseline = model.forward(torch.zeros_like(inputs)).softmax(dim=1)
                alpha = alpha - resolved.select(baseline).unsqueeze(1)
            maps.append(torch.einsum("nck,nc...->nk...", alpha, f))
        return _attribution(
            hooked, maps, record.scores,
            {name: record.calls(name) for name in hooked}, grids, layers is not None, relu,
            weights=weights,
        )

    @staticmethod
    def masked_scores(
        model: LayerAccess,
        inputs: torch.Tensor,
        acts: torch.Tensor,
        resolved: ResolvedTargets,
        weights: str,
        batch_size: int,
    ) -> torch.Tensor:
        """The target scores ``(N, C, K)`` of every sample masked by each of its channels."""
        n, c = acts.shape[:2]
        channels = acts.flatten(0, 1).unsqueeze(1)  # (N*C, 1, *s): one mask source per row
        # bilinear / trilinear with aligned corners, as pytorch-grad-cam's UpsamplingBilinear2d
        mode = "bilinear" if inputs.ndim == 4 else "trilinear"
        out = torch.empty(n * c, resolved.count, device=inputs.device, dtype=inputs.dtype)

        def evaluate(rows: torch.Tensor) -> torch.Tensor:
            up = F.interpolate(channels[rows], size=inputs.shape[2:], mode=mode,
                               align_corners=True).flatten(1)
            low, high = up.amin(dim=1, keepdim=True), up.amax(dim=1, keepdim=True)
            # a constant channel masks everything out (pytorch-grad-cam: 0 / 1e-8)
            masks = torch.where(high > low, (up - low) / (high - low), 0.0)
            samples = rows // c
            masked = inputs[samples] * masks.view(len(rows), 1, *inputs.shape[2:])
            with torch.no_grad():
                outputs = model.forward(masked)
            if weights != "softmax":  # class probabilities
                outputs = outputs.softmax(dim=1)
            return resolved.select(outputs, samples)

        evaluate_in_chunks(evaluate, out, batch_size)
        return out.view(n, c, -1)


# -- CAMs that edit the layer's output (Ablation-CAM, Recipro-CAM) ---------------------------


class EditingModel(LayerAccess, LayerOutputEditing, Protocol):
    """What Ablation-CAM and Recipro-CAM need of an adapter: both protocols."""


MaskSource = Callable[[torch.Tensor], torch.Tensor]


def native_masks(masks: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Masks ``(V, C or 1, *grid or 1s)`` over the channels-first feature map, as multipliers of
    the layer's own output ``(N, ...)``, broadcastable to ``(V, ...)``. A token layer's leading
    class/register tokens are not part of the map: they are kept (multiplied by 1)."""
    if layout.kind == "channels_first":
        return masks
    if layout.kind == "channels_last":
        return masks.movedim(1, -1)
    tokens = masks.expand(*masks.shape[:2], *layout.grid).flatten(2).transpose(1, 2)  # (V, Z, C)
    keep = tokens.new_ones(tokens.shape[0], layout.extra, tokens.shape[2])
    return torch.cat([keep, tokens], dim=1)


def edited_scores(
    model: EditingModel,
    inputs: torch.Tensor,
    layer: str,
    layout: Layout,
    count: int,
    masks_of: MaskSource,
    resolved: ResolvedTargets,
    batch_size: int,
    probabilities: bool,
) -> torch.Tensor:
    """The target scores ``(N, V, K)`` of every sample with ``layer``'s output multiplied by
    each of ``count`` masks (``masks_of(indices)``: those masks, as :func:`native_masks` takes
    them), ``batch_size`` edited copies per forward pass; the target's softmax probability
    where ``probabilities``.

    One sample per forward pass: the layers before ``layer`` run for that sample only, so they
    run ``N * ceil(V / batch_size)`` times in all (all samples in every pass would cost ``N``
    times that), and an earlier tensor the model adds later (a residual) broadcasts over the
    copies of its one sample, so the adapter need not repeat the inputs."""
    n = inputs.shape[0]
    out = torch.empty(n, count, resolved.count, device=inputs.device, dtype=inputs.dtype)
    for i in range(n):
        sample = inputs[i : i + 1]

        def evaluate(rows: torch.Tensor, i: int = i, sample: torch.Tensor = sample):
            masks = native_masks(masks_of(rows), layout)

            def edit(a: torch.Tensor) -> torch.Tensor:  # (1, ...) -> (len(rows), ...)
                return a * masks.to(a.dtype)

            scores = model.run_with_layer_output(sample, layer, edit, variants=len(rows))
            if probabilities:
                scores = scores.softmax(dim=1)
            return resolved.select(scores, torch.full_like(rows, i))

        evaluate_in_chunks(evaluate, out[i], batch_size)
    return out


class EditingCAM:
    """The shared path of the CAMs that edit the layer's output: one forward pass recording the
    layers (scores, activations, the targets resolved), then per layer the target scores under
    each edit (:func:`edited_scores`) turned into maps by :meth:`maps`."""

    name = "editing-cam"  # overridden by every registered subclass
    tags = Tags("local", "model-specific", requires={Capability.LAYERS, Capability.LAYER_EDITS})
    probabilities = False  # whether the edits are scored by the target's softmax probability

    def edits(self, features: torch.Tensor) -> tuple[int, MaskSource]:
        """How many edits of this feature map ``(N, C, *s)``, and their masks by index."""
        raise NotImplementedError

    def maps(
        self, features: torch.Tensor, scores: torch.Tensor, original: torch.Tensor
    ) -> torch.Tensor:
        """Maps ``(N, K, *s)`` from the edited scores ``(N, V, K)`` and the original ``(N, K)``."""
        raise NotImplementedError

    def run(
        self,
        model: EditingModel,
        inputs: torch.Tensor,
        targets: Targets,
        layer: str | nn.Module | None,
        layers: Sequence[str | nn.Module] | None,
        batch_size: int,
        relu: bool,
        class_token: bool | int | None,
        **details: object,
    ) -> Attribution:
        hooked = _layers_asked(model, inputs, layer, layers)
        record = model.record_layers(inputs, hooked)
        resolved = targets.resolve(record.scores)
        original = resolved.select(record.scores)  # (N, K)
        acts = [record.last(name) for name in hooked]
        grids = _layouts(model, inputs, hooked, acts, class_token)
        maps = []
        for name, a, grid in zip(hooked, acts, grids, strict=True):
            f = as_feature_map(a, grid)
            count, masks_of = self.edits(f)
            scores = edited_scores(model, inputs, name, grid, count, masks_of, resolved,
                                   batch_size, self.probabilities)
            maps.append(self.maps(f, scores, original))
        return _attribution(
            hooked, maps, record.scores,
            {name: record.calls(name) for name in hooked}, grids, layers is not None, relu,
            **details,
        )


class AblationCAM(EditingCAM):
    """Ablation-CAM (Desai and Ramaswamy 2020): channel ``k``'s weight is the relative drop of
    the target's score when the layer's channel ``k`` is set to zero,
    ``w_k = (y - y_k) / y``; map ``ReLU(sum_k w_k A_k)``. Every sample's ``C`` ablated copies of
    the layer's output go on through the rest of the model in batches of ``batch_size``
    (:meth:`~xai_core.core.adapters.LayerOutputEditing.run_with_layer_output`). A target whose
    score is exactly 0 gets the weights 0 (no relative drop is defined)."""

    name = "ablationcam"

    def explain(
        self,
        model: EditingModel,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        layers: Sequence[str | nn.Module] | None = None,
        batch_size: PositiveInt = 64,
        relu: bool = True,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param batch_size: ablated copies of the layer's output per forward pass.
        The other options as :meth:`GradientWeightedCAM.explain`."""
        return self.run(model, inputs, targets, layer, layers, batch_size, relu, class_token)

    def edits(self, features: torch.Tensor) -> tuple[int, MaskSource]:
        c, rank = features.shape[1], features.ndim - 2

        def masks_of(rows: torch.Tensor) -> torch.Tensor:  # (V, C, 1, ...): all but channel k
            keep = 1 - F.one_hot(rows, c).to(features.dtype)
            return keep.view(len(rows), c, *([1] * rank))

        return c, masks_of

    def maps(
        self, features: torch.Tensor, scores: torch.Tensor, original: torch.Tensor
    ) -> torch.Tensor:
        defined = (original != 0).unsqueeze(1)
        y = original.unsqueeze(1)
        weights = torch.where(defined, (y - scores) / torch.where(defined, y, 1.0), 0.0)
        return torch.einsum("nck,nc...->nk...", weights, features)


# Recipro-CAM's smoothed masks: the 3 x 3 kernel of the authors' code, [1, 2, 1] / 4 per axis.
_GAUSSIAN_TAPS = (0.25, 0.5, 0.25)


class ReciproCAM(EditingCAM):
    """Recipro-CAM (Byun and Lee 2022): gradient-free. For each position ``p`` of the layer's
    grid, the feature map with every other position zeroed (``"point"``), or with the
    neighbourhood of ``p`` kept under the 3 x 3 (x 3) kernel ``[1, 2, 1] / 4`` per axis and the
    rest zeroed (``"gaussian"``, the authors' code), goes on through the rest of the model;
    the map at ``p`` is the target's softmax probability. All positions of all samples run in
    batches of ``batch_size`` edited copies; no forward pass repeats the layers before."""

    name = "reciprocam"
    probabilities = True

    def explain(
        self,
        model: EditingModel,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: str | nn.Module | None = None,
        layers: Sequence[str | nn.Module] | None = None,
        kernel: Literal["point", "gaussian"] = "point",
        batch_size: PositiveInt = 64,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param kernel: ``"point"`` keeps one position per copy, ``"gaussian"`` its
            neighbourhood weighted by ``[1, 2, 1] / 4`` per axis (zero outside the grid).
        :param batch_size: edited copies of the layer's output per forward pass.
        Probabilities are not negative: there is no ``relu`` option. The other options as
        :meth:`GradientWeightedCAM.explain`."""
        if kernel not in ("point", "gaussian"):
            raise OptionError(f"kernel must be 'point' or 'gaussian'; got {kernel!r}.")
        self.kernel = kernel
        return self.run(model, inputs, targets, layer, layers, batch_size, False, class_token,
                        kernel=kernel)

    def edits(self, features: torch.Tensor) -> tuple[int, MaskSource]:
        grid = features.shape[2:]
        positions = math.prod(grid)

        def masks_of(rows: torch.Tensor) -> torch.Tensor:  # (V, 1, *grid)
            masks = F.one_hot(rows, positions).to(features.dtype).view(len(rows), 1, *grid)
            if self.kernel == "gaussian":
                taps = torch.tensor(_GAUSSIAN_TAPS, dtype=features.dtype, device=rows.device)
                for axis in range(2, masks.ndim):  # separable: one 3-tap pass per axis
                    padded = F.pad(masks.movedim(axis, -1), (1, 1))
                    masks = (padded.unfold(-1, 3, 1) * taps).sum(-1).movedim(-1, axis)
            return masks

        return positions, masks_of

    def maps(
        self, features: torch.Tensor, scores: torch.Tensor, original: torch.Tensor
    ) -> torch.Tensor:
        return scores.transpose(1, 2).unflatten(2, features.shape[2:])  # (N, K, *grid)


@xai_core.hookimpl
def register_explainers(register):
    for explainer in (
        GradCAM, HiResCAM, XGradCAM, LayerCAM, EigenCAM, ScoreCAM, AblationCAM, ReciproCAM
    ):
        register(explainer)
