"""GPT Lab's engine, grouped by feature; never imports streamlit (the app's pages are thin views).

- :mod:`core.models`: our GPT, attention, the layer-stack adapter every workbench walks, loading
  by model spec, weight conversion, tokenizers, the shipped default.
- :mod:`core.generation`: autoregressive and diffusion samplers, side by side.
- :mod:`core.consensus`: iterate the layer stack and measure convergence; the continuous-time
  simulation.
- :mod:`core.training`: the trainer, data, schedules, the masked-diffusion objective.
- :mod:`core.interp`: transcoders, the feature store, explanations and scores.
- :mod:`core.jobs`: the runner for detached jobs (training runs, transcoder jobs).
- :mod:`core.commands`: the command line, ``python -m core <command>``.

Importing ``core`` is cheap: names load on first use.
"""
from .compat import install_old_module_names
from .errors import LabError
from .lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, names(".models.loading", "LoadedModel", "load_model"))
install_old_module_names()

__all__ = ["LabError", "LoadedModel", "load_model"]
