"""A plugin that raises KeyboardInterrupt itself when imported (no Ctrl-C was pressed)."""

raise KeyboardInterrupt("raised by the plugin, not by the user")
