"""Lazy re-exports for package ``__init__`` files.

A package's ``__init__`` runs whenever any of its modules is imported, so one that imported its
engine eagerly would make ``python -m core --help`` (which only needs torch-free config modules)
pay for torch. Packages list what they re-export and where it lives; the module is imported on
first use of a name (PEP 562).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule
    (relative, e.g. ``".engine"``) that defines it."""

    def __getattr__(name: str) -> Any:
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(where, package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


def names(module: str, *public: str) -> dict[str, str]:
    """``{name: module}`` for each of ``public``: the ``exports`` table, one line per submodule."""
    return {p: module for p in public}
