"""Plugins that misbehave with BaseExceptions; each entry point is one of the modules here."""
