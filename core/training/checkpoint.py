"""Sharded checkpoints: every process writes its own shard with torch.distributed.checkpoint.

An FSDP run's ``checkpoints/<step>/`` keeps the layout of every GPT Lab checkpoint (config.json,
tokenizer.json, trainer_state.pt), except that the weights and the optimizer state live in
``shards/`` instead of ``model.safetensors``: DCP's ``.metadata`` plus one ``__<rank>_0.distcp``
file per process. The folder is written under a hidden temporary name by all ranks and renamed by
rank 0 once every shard is on disk, so a checkpoint appears whole or not at all, as before.

DCP records where each piece of each tensor lies, so a sharded checkpoint loads into any number of
processes (2 -> 1, 1 -> 2, ...) and into an unsharded model: :func:`consolidated_weights` turns
one into a plain state dict when the folder is loaded as a ``--model`` spec (``generate``,
``export``, the pages). Multi-node runs need the run folder on storage every node sees.

DCP's ``.metadata`` is a pickle. It is read with an unpickler that builds only DCP's own metadata
classes and a few torch and Python types, and the shards' non-tensor entries with
``torch.load(weights_only=True)``, so a tampered folder is refused instead of run.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LabError, first_line

SHARDS_DIR = "shards"
_SHARD_NAME = re.compile(r"__\d+_\d+\.distcp")


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds its weights as DCP shards (``shards/.metadata``)."""
    return (Path(folder) / SHARDS_DIR / ".metadata").is_file()


def shard_bytes(folder: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in (Path(folder) / SHARDS_DIR).glob("*.distcp"))


# -- reading .metadata without running arbitrary pickles ------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "SerializationFormat"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch": {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
              "bool", "strided", "contiguous_format", "preserve_format", "channels_last"},
    "torch.serialization": {"_get_layout"},
    "torch._utils": {"_rebuild_device_tensor_from_numpy"},
    "builtins": {"set", "frozenset", "slice", "getattr"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # the checkpoint id
    "enum": set(),
    "copyreg": {"_reconstructor"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get(module)
        if allowed is None or name not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def _reader(shards: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / ".metadata"
            try:
                metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, OSError) as e:
                raise LabError(f"Refused to read {path}: it is not the metadata of a sharded checkpoint "
                               f"({first_line(e)}); delete the checkpoint folder to use the one before it.") from None
            for info in (getattr(metadata, "storage_data", None) or {}).values():
                name = str(getattr(info, "relative_path", ""))
                if not _SHARD_NAME.fullmatch(name):  # a shard is a file of this folder, never a path out of it
                    raise LabError(f"Refused to read {path}: it names the shard file {name[:80]!r}, which is not one "
                                   f"of this folder's __<rank>_<n>.distcp files; delete the checkpoint folder to use "
                                   f"the one before it.")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(shards))


# -- save and load during training ---------------------------------------------------------------

def save_sharded(folder: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """All ranks: write this rank's shard of the weights and the optimizer state to ``folder/shards``
    (``folder`` is the same temporary checkpoint folder on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizers)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(str(folder / SHARDS_DIR)))


def load_sharded(folder: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """All ranks: fill ``model`` and ``optimizers`` (sharded or not, any number of ranks) from the
    shards in ``folder``; DCP reads each rank's pieces wherever the saving ranks put them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():  # one unsharded process: DCP warns that it assumes just that
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_reader(folder / SHARDS_DIR))
    except LabError:
        raise
    except Exception as e:  # DCP wraps every rank's failure in one CheckpointException
        raise LabError(f"The shards of checkpoint {folder} cannot be read into this run ({first_line(e)[:200]}); "
                       f"delete that folder to resume from the checkpoint before it.") from None
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_into(model: nn.Module, optimizers: list[torch.optim.Optimizer], weights: dict[str, torch.Tensor],
                   optim_states: list[dict]) -> None:
    """Load an unsharded checkpoint (model.safetensors and ``Optimizer.state_dict()`` lists) into a
    sharded model: the optimizer states are re-keyed from positions to parameter names, which is
    the form ``set_state_dict`` takes for full state dicts, and every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    merged: dict = {"state": {}, "param_groups": []}
    for opt, saved in zip(optimizers, optim_states):
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        for idx, st in saved["state"].items():
            merged["state"][order[int(idx)]] = st
        for g in saved["param_groups"]:
            merged["param_groups"].append({**g, "params": [order[int(i)] for i in g["params"]]})
    set_state_dict(model, optimizers, model_state_dict=weights, optim_state_dict=merged,
                   options=StateDictOptions(full_state_dict=True, strict=True))


# -- a sharded checkpoint as a model ---------------------------------------------------------------

def consolidated_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model's weights from a sharded checkpoint, on the CPU, in one process (no process
    group needed): what loading the folder as a ``--model`` spec and ``export`` read."""
    import torch.distributed.checkpoint as dcp

    shards = Path(folder) / SHARDS_DIR
    reader = _reader(shards)
    meta = reader.read_metadata()
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    target: dict[str, torch.Tensor] = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            target[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not target:
        raise LabError(f"{shards} holds no model weights; the checkpoint is incomplete, so load an earlier one.")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": target}, storage_reader=_reader(shards), no_dist=True)
    except LabError:
        raise
    except Exception as e:
        raise LabError(f"The shards in {shards} are incomplete or damaged ({first_line(e)[:200]}); load an "
                       f"earlier checkpoint.") from None
    return target


def write_model_files(folder: Path, config, tokenizer_json: str | None, *, objective: str, extra: dict) -> None:
    """config.json and tokenizer.json of a sharded checkpoint: what ``save_checkpoint`` writes beside
    the weights, so the folder reads as a GPT Lab model (``extra["sharded"]`` says where they are)."""
    from ..files import atomic_write_json, atomic_write_text
    from ..models.loading import CHECKPOINT_FORMAT

    if tokenizer_json is not None:
        atomic_write_text(folder / "tokenizer.json", Path(tokenizer_json).read_text(encoding="utf-8"))
    atomic_write_json(folder / "config.json", {"format": CHECKPOINT_FORMAT, "format_version": 1,
                                               "model": config.to_dict(), "objective": objective,
                                               "untrained": False, **extra})
