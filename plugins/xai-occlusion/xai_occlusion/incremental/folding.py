"""BatchNorm folding: a convolution followed by an eval BatchNorm runs as one convolution with
the normalisation folded into its weights (the BatchNorm then passes its input through)."""

from __future__ import annotations

from collections.abc import Container, Mapping

import torch
from torch import fx, nn

from xai_occlusion.incremental.operators import _CONV, _own_forward


def fold_batchnorm(
    node: fx.Node, modules: Mapping[str, nn.Module], planned: Container[fx.Node]
) -> tuple[fx.Node, tuple[torch.Tensor, torch.Tensor]] | None:
    """Fold an eval BatchNorm that is a convolution's only user into its weights: the BatchNorm's
    node and the folded ``(weight, bias)``, or ``None``. ``planned``: the nodes the engine runs."""
    if node.op != "call_module" or len(node.users) != 1:
        return None
    conv = modules[node.target]
    (user,) = node.users
    if (
        type(conv) not in _CONV
        or conv.padding_mode != "zeros"
        or user.op != "call_module"
        or user.args != (node,)
        or user.kwargs
        or user not in planned
    ):
        return None
    norm = modules[user.target]
    if (
        not _own_forward(norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        or norm.training
        or norm.running_mean is None
        or norm.running_mean.numel() != conv.out_channels
    ):
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.view(-1, *[1] * (conv.weight.ndim - 1))
    return user, (weight.to(conv.weight.dtype), shift.to(conv.weight.dtype))
