"""The ``xai`` command line: commands (:mod:`.app`) and the resumable batch job behind
``xai explain`` / ``xai compare`` (:mod:`.jobs`)."""

from xai_core.cli.app import build_app, main

__all__ = ["build_app", "main"]
