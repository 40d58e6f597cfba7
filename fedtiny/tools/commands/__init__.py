"""The handlers of ``fedtiny``'s commands, one module per command.

:mod:`fedtiny.tools.cli` declares each command's arguments and imports a command's module only when the
command runs; a handler takes the parsed arguments and returns the exit status.
"""
