"""The module paths GPT Lab had before the engine was grouped by feature, kept importable for one
release so users' scripts keep working (``from core.loading import load_model`` still loads
:mod:`core.models.loading`). Each old path names the very module object of its new home, so a
patch or a ``isinstance`` check through either name sees the same thing. Remove after 0.3.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

OLD_MODULE_NAMES = {
    "core.gpt": "core.models.gpt",
    "core.attention": "core.models.attention",
    "core.stack": "core.models.stack",
    "core.loading": "core.models.loading",
    "core.convert": "core.models.convert",
    "core.statedict": "core.models.statedict",
    "core.tokenizer": "core.models.tokenizer",
    "core.decode_layout": "core.models.decode_layout",
    "core.default_model": "core.models.default",
    "core.validate": "core.models.validate",
    "core.sampling": "core.generation.sampling",
    "core.training.diffusion": "core.generation.diffusion",
    "core.consensus_metrics": "core.consensus.metrics",
    "core.consensus_io": "core.consensus.files",
    "core.simulation": "core.consensus.simulation",
    "core.cli": "core.commands.cli",
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OLD_MODULE_NAMES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = OLD_MODULE_NAMES[spec.name]
        warnings.warn(f"{spec.name} is now {new}; the old name goes in the next release.", DeprecationWarning,
                      stacklevel=3)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system stamps the old name's spec on it next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # the module keeps its own identity


def install_old_module_names() -> None:
    if not any(isinstance(f, _OldNames) for f in sys.meta_path):
        sys.meta_path.append(_OldNames())
