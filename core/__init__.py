"""GPT Lab's engine: models, loading, the layer-stack adapter, generation and the CLI.

Never imports streamlit: the app's pages are thin views over these functions.
"""
from .errors import LabError
from .loading import LoadedModel, load_model

__all__ = ["LabError", "LoadedModel", "load_model"]
