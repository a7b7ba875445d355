"""``python -m core <command>``: see :mod:`core.cli`."""
from .cli import main

raise SystemExit(main())
