"""A plugin that raises GeneratorExit when imported."""

raise GeneratorExit("out of nowhere")
