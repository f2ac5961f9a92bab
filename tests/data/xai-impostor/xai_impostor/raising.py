"""An adapter plugin that raises for every model."""

import xai_core


@xai_core.hookimpl
def adapt_model(model, options):
    raise RuntimeError("the adapter plugin crashed")
