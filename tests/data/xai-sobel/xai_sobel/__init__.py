"""Sobel edge magnitude: a map that does not depend on the model (a sanity-check baseline)."""

import torch
import torch.nn.functional as F

import xai_core
from xai_core import Attribution, Tags


class Sobel:
    """Edge magnitude of the channel-mean image; the model is only asked for its scores."""

    name = "sobel"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets, *, smooth: float = 0.0):
        with torch.no_grad():
            scores = model.forward(inputs)
        count = targets.resolve(scores).count
        gray = inputs.mean(dim=1, keepdim=True)
        if gray.ndim != 4:
            raise xai_core.errors.InputError("sobel works on 2D images only")
        kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], device=inputs.device)
        kernels = torch.stack([kx, kx.T]).unsqueeze(1).to(inputs.dtype)
        edges = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = edges.pow(2).sum(1).add(smooth).sqrt()
        return Attribution(maps=magnitude.unsqueeze(1).expand(-1, count, -1, -1), scores=scores)


@xai_core.hookimpl
def register_explainers(register):
    register(Sobel)
