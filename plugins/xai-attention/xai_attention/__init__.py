"""Attention maps for vision transformers, as one xai-core plugin (docs/methods/attention.md).

With ``A_l`` the softmax attention ``(N, heads, T, T)`` of the ``l``-th attention call in forward
order, ``y`` a target score (a logit) and ``I`` the identity::

    attention:     map = fuse_h A_l[h]                                    (one layer, one/all heads)
    rollout:       A~_l = rownorm(0.5 fuse_h A_l + 0.5 I),  R = A~_L ... A~_1       (Abnar 2020)
    grad_rollout:  Abar_l = mean_h ReLU(dy/dA_l ⊙ A_l),     R = (I + Abar_L) ... (I + Abar_1)
                                                                                   (Chefer 2021)

and the map is the class token's row over the patch tokens, ``R[CLS, patches]``, on the patch
grid; for models without a class token (mean pooling) it is the mean over all rows. Raw attention
and rollout do not depend on the target: they return the same map for each of the ``K`` targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Protocol

import torch

import xai_core
from xai_core import Attribution, Capability, Tags, Targets
from xai_core.core.adapters import AttentionAccess, AttentionGradients, ModelAdapter
from xai_core.core.errors import CapabilityError, LayerNotFoundError, OptionError, did_you_mean
from xai_core.core.options import Range
from xai_core.torch.ops import token_layout

__version__ = "0.1.0"

Call = tuple[str, torch.Tensor]  # (module name, its weights (N, heads, T, T)) for one call

FUSIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda a: a.mean(dim=1),
    "max": lambda a: a.amax(dim=1),
    "min": lambda a: a.amin(dim=1),
}


# -- the model's attention -------------------------------------------------------------------------


class WithAttentionGradients(AttentionAccess, AttentionGradients, Protocol):
    """What gradient-weighted rollout needs of an adapter: both protocols."""


def not_applicable(model: ModelAdapter) -> str | None:
    """Why attention maps cannot be drawn for ``model``, or ``None`` (``unsupported_reason``)."""
    if not isinstance(model, AttentionAccess):  # declared ATTENTION without the protocol
        return f"attention maps need the attention weights of the model; {model.kind} gives none"
    windowed = model.windowed_attention()
    if windowed is not None:
        return (
            f"the model attends within windows ({windowed!r} splits the tokens into windows, as "
            f"Swin and MaxViT do): each attention matrix covers one window, there is no class "
            f"token and no T x T matrix over the whole image to roll out or show; use gradcam "
            f"(its default layer lays the stage's tokens out on the image grid) or a "
            f"perturbation method"
        )
    return None


def check_calls(calls: list[Call], inputs: torch.Tensor) -> list[Call]:
    """Every attention call ``(name, weights)`` of one forward pass, in call order, checked to
    be self-attention over the whole image: ``(N, heads, T, T)``."""
    if not calls:
        raise CapabilityError(
            "No attention module was called during the forward pass, so there are no attention "
            "weights to show."
        )
    for name, weights in calls:
        windows = weights.shape[0] // inputs.shape[0] if weights.ndim == 4 else 1
        if windows > 1 and weights.shape[0] == windows * inputs.shape[0]:
            raise CapabilityError(
                f"Attention layer {name!r} attends within {weights.shape[0] // inputs.shape[0]} "
                f"windows per image (weights {tuple(weights.shape)} for N={inputs.shape[0]}): "
                f"windowed attention has no T x T matrix over the image to show or roll out; use "
                f"gradcam or a perturbation method."
            )
        if (
            weights.ndim != 4
            or weights.shape[0] != inputs.shape[0]
            or (weights.shape[-1] != weights.shape[-2])
        ):
            raise CapabilityError(
                f"Attention layer {name!r} gave weights of shape {tuple(weights.shape)}; attention "
                f"maps need self-attention weights (N={inputs.shape[0]}, heads, T, T)."
            )
    return calls


def extra_tokens(model: AttentionAccess, class_token: bool | int | None) -> bool | int | None:
    """The user's ``class_token``, else the count of extra tokens the model declares."""
    return model.extra_tokens() if class_token is None else class_token


def pick_layer(calls: list[Call], layer: int | str) -> Call:
    """One attention call: by index in call order, or by module name (its last call)."""
    if isinstance(layer, str):
        matches = [call for call in calls if call[0] == layer]
        if not matches:
            names = list(dict.fromkeys(name for name, _ in calls))
            raise LayerNotFoundError(
                f"No attention layer named {layer!r} ran.{did_you_mean(layer, names)} Attention "
                f"layers: {', '.join(names)}."
            )
        return matches[-1]
    if not -len(calls) <= layer < len(calls):
        raise OptionError(
            f"layer={layer} is out of range: the model made {len(calls)} attention calls "
            f"(use 0..{len(calls) - 1}, or negative indices from the last)."
        )
    return calls[layer]


def same_tokens(calls: list[Call]) -> int:
    """The token count ``T`` shared by every attention call (rollout multiplies their matrices)."""
    counts = {name: weights.shape[-1] for name, weights in calls}
    if len(set(counts.values())) > 1:
        raise CapabilityError(
            f"Rollout multiplies the attention matrices of all layers, which needs one token "
            f"count; these layers attend over different numbers of tokens: {counts}. Use "
            f"method='attention' for a single layer."
        )
    return calls[0][1].shape[-1]


# -- tokens to an image grid -----------------------------------------------------------------------


def token_map(relevance: torch.Tensor, extra: int, grid: tuple[int, ...]) -> torch.Tensor:
    """``(..., T, T)`` token-to-token relevance -> ``(..., *grid)`` over the patches (the last
    tokens, after ``extra`` class/distillation/register tokens): the class token's row, or for
    mean-pooled models (no extra token) the mean of all rows."""
    if extra:
        return relevance[..., 0, extra:].unflatten(-1, grid)
    return relevance.mean(dim=-2).unflatten(-1, grid)


# -- the equations ---------------------------------------------------------------------------------


def fuse_heads(weights: torch.Tensor, head: int | str) -> torch.Tensor:
    """``(N, heads, T, T)`` -> ``(N, T, T)``: one head by index, or fused by mean, max or min."""
    if isinstance(head, str):
        return FUSIONS[head](weights)
    heads = weights.shape[1]
    if not -heads <= head < heads:
        raise OptionError(f"head={head} is out of range: this layer has {heads} heads.")
    return weights[:, head]


def check_head(head: Any, *, allow_index: bool) -> None:
    """Refuse a bad ``head`` option before the model runs."""
    if isinstance(head, str) and head in FUSIONS:
        return
    if allow_index and isinstance(head, int) and not isinstance(head, bool):
        return
    kinds = "a head index (int) or " if allow_index else ""
    raise OptionError(f"Expected {kinds}one of {sorted(FUSIONS)}; got {head!r}.")


def discard_lowest(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` fraction of smallest entries of each ``(T, T)`` matrix."""
    flat = a.flatten(-2)
    count = int(ratio * flat.shape[-1])
    if count == 0:
        return a
    lowest = flat.topk(count, dim=-1, largest=False).indices
    return flat.scatter(-1, lowest, 0.0).view_as(a)


def chain(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``M_L ... M_1`` for matrices given in forward order (layer 1 first)."""
    product = matrices[0]
    for m in matrices[1:]:
        product = m @ product
    return product


def per_target(maps: torch.Tensor, count: int) -> torch.Tensor:
    """``(N, *grid)`` -> ``(N, K, *grid)``: one copy per target, for target-independent maps."""
    return maps.unsqueeze(1).expand(maps.shape[0], count, *maps.shape[1:]).clone()


def span(names: Sequence[str]) -> str:
    """One label for a map combining several layers: ``first..last`` in call order."""
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


# -- the explainers --------------------------------------------------------------------------------


class RawAttention:
    """Raw attention of one layer: from the class token (or all tokens) to the patches."""

    name = "attention"
    tags = Tags("local", "model-specific", requires={Capability.ATTENTION})

    @classmethod
    def unsupported_reason(cls, model: ModelAdapter) -> str | None:
        return not_applicable(model)

    def explain(
        self,
        model: AttentionAccess,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        layer: int | str = -1,
        head: int | Literal["mean", "max", "min"] = "mean",
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param layer: which attention call, by index in forward order (default: the last), or
            an attention module's name (its last call).
        :param head: a head index, or ``"mean"``, ``"max"`` or ``"min"`` over heads.
        :param class_token: token 0 is a class token (``True``; more extra tokens such as
            registers may follow it) or a patch (``False``), or an ``int``: the number of leading
            non-patch tokens; ``None`` decides from the token count.
        """
        check_head(head, allow_index=True)
        if isinstance(layer, bool) or not isinstance(layer, int | str):
            raise OptionError(f"layer is an index (int) or a module name (str); got {layer!r}.")
        scores, calls = model.attention_weights(inputs)
        calls = check_calls(calls, inputs)
        resolved = targets.resolve(scores)
        name, weights = pick_layer(calls, layer)
        tokens = weights.shape[-1]
        extra, grid = token_layout(tokens, inputs.shape[2:], extra_tokens(model, class_token))
        maps = token_map(fuse_heads(weights, head), extra, grid)
        return Attribution(
            maps=per_target(maps, resolved.count),
            scores=scores.detach(),
            layers=[name],
            details={
                "head": head,
                "class_token": bool(extra),
                "extra_tokens": extra,
                "grid": grid,
                "heads": weights.shape[1],
                "attention_layers": [n for n, _ in calls],
                "target_independent": True,
            },
        )


class AttentionRollout:
    """Attention rollout (Abnar & Zuidema 2020): attention propagated through all layers."""

    name = "rollout"
    tags = Tags("local", "model-specific", requires={Capability.ATTENTION})

    @classmethod
    def unsupported_reason(cls, model: ModelAdapter) -> str | None:
        return not_applicable(model)

    def explain(
        self,
        model: AttentionAccess,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        head_fusion: Literal["mean", "max", "min"] = "mean",
        discard_ratio: Annotated[float, Range(0, 1, max_inclusive=False)] = 0.0,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads.
        :param discard_ratio: fraction in [0, 1) of each layer's smallest fused weights set to
            zero before the identity is added (a noise filter from jacobgil/vit-explain).
        :param class_token: token 0 is a class token (``True``; more extra tokens such as
            registers may follow it) or a patch (``False``), or an ``int``: the number of leading
            non-patch tokens; ``None`` decides from the token count.
        """
        check_head(head_fusion, allow_index=False)
        if not 0.0 <= discard_ratio < 1.0:
            raise OptionError(f"discard_ratio must lie in [0, 1); got {discard_ratio!r}.")
        scores, calls = model.attention_weights(inputs)
        calls = check_calls(calls, inputs)
        resolved = targets.resolve(scores)
        tokens = same_tokens(calls)
        extra, grid = token_layout(tokens, inputs.shape[2:], extra_tokens(model, class_token))
        eye = torch.eye(tokens, dtype=calls[0][1].dtype, device=calls[0][1].device)
        tilde = []
        for _, weights in calls:
            a = 0.5 * discard_lowest(fuse_heads(weights, head_fusion), discard_ratio) + 0.5 * eye
            tilde.append(a / a.sum(dim=-1, keepdim=True))  # rows renormalised
        maps = token_map(chain(tilde), extra, grid)
        names = [n for n, _ in calls]
        return Attribution(
            maps=per_target(maps, resolved.count),
            scores=scores.detach(),
            layers=[span(names)],
            details={
                "head_fusion": head_fusion,
                "discard_ratio": discard_ratio,
                "class_token": bool(extra),
                "extra_tokens": extra,
                "grid": grid,
                "attention_layers": names,
                "target_independent": True,
            },
        )


class GradAttentionRollout:
    """Gradient-weighted attention rollout (Chefer et al. 2021): class-specific relevance."""

    name = "grad_rollout"
    tags = Tags("local", "model-specific", requires={Capability.ATTENTION, Capability.GRADIENTS})

    @classmethod
    def unsupported_reason(cls, model: ModelAdapter) -> str | None:
        return not_applicable(model)

    def explain(
        self,
        model: WithAttentionGradients,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        class_token: bool | int | None = None,
    ) -> Attribution:
        """:param class_token: token 0 is a class token (``True``; more extra tokens such as
            registers may follow it) or a patch (``False``), or an ``int``: the number of leading
            non-patch tokens; ``None`` decides from the token count."""
        run = model.attention_gradients(inputs, targets)  # targets resolved on its scores
        scores, calls = run.scores, check_calls(run.calls, inputs)
        tokens = same_tokens(calls)
        extra, grid = token_layout(tokens, inputs.shape[2:], extra_tokens(model, class_token))
        names = [n for n, _ in calls]
        eye = torch.eye(tokens, dtype=calls[0][1].dtype, device=calls[0][1].device)
        per_target = []  # one backward pass per target, reduced at once
        for grads in run.gradients:
            steps = []
            for (name, weights), grad in zip(calls, grads, strict=True):
                if grad is None:
                    raise CapabilityError(
                        f"The scores do not depend on the weights recorded by attention layer "
                        f"{name!r}: record the very tensor that multiplies the values."
                    )
                a_bar = (grad * weights).clamp(min=0).mean(dim=1)  # both (N, heads, T, T)
                steps.append(eye + a_bar)  # R <- R + Abar R, the paper's update
            per_target.append(token_map(chain(steps), extra, grid))  # (N, *grid)
        maps = torch.stack(per_target, dim=1)  # (N, K, *grid)
        return Attribution(
            maps=maps.contiguous(),
            scores=scores,
            layers=[span(names)],
            details={
                "class_token": bool(extra),
                "extra_tokens": extra,
                "grid": grid,
                "attention_layers": names,
                "target_independent": False,
            },
        )


@xai_core.hookimpl
def register_explainers(register: Callable[[type], None]) -> None:
    register(RawAttention)
    register(AttentionRollout)
    register(GradAttentionRollout)
