"""A plugin whose hook registers one class and then raises: nothing of it may be kept."""

import xai_core
from xai_core import Tags


class HalfRegistered:
    name = "half_registered"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets):
        raise NotImplementedError


@xai_core.hookimpl
def register_explainers(register):
    register(HalfRegistered)
    raise RuntimeError("the plugin's registration crashed")
