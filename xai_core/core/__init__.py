"""The protocol layer: what an explainer, a metric and a model adapter are, the hooks a plugin
implements, the registry that finds plugins, and ``explain()``.

Depends on torch, pluggy and the standard library only; every other layer builds on this one
(see docs/architecture.md and the import-linter contract in pyproject.toml).
"""
