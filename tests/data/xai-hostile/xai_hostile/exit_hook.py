"""A plugin whose registration hook registers a class and then calls sys.exit()."""

import sys

import xai_core
from xai_core import Tags


class ExitsAfterRegistering:
    name = "exits_after_registering"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets):
        raise NotImplementedError


@xai_core.hookimpl
def register_explainers(register):
    register(ExitsAfterRegistering)
    sys.exit(2)
