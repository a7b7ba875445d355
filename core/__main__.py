"""``python -m core <command>``: see :mod:`core.commands.cli`."""
from .commands.cli import main

raise SystemExit(main())
