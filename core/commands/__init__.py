"""The CLI's commands, one module each.

A module here becomes ``python -m core <NAME>`` by exposing ``NAME`` (the command), ``HELP``
(one line for ``--help``), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
:mod:`core.commands.cli` finds them with pkgutil, so adding a command never touches the CLI itself.
Import heavy libraries (torch, transformers) inside ``run`` so ``--help`` stays instant.
"""
