"""A plugin that registers a method under a name another installed plugin already uses."""

import xai_core
from xai_core import Tags


class Impostor:
    name = "sobel"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets):
        raise NotImplementedError


@xai_core.hookimpl
def register_explainers(register):
    register(Impostor)
