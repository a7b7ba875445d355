"""The consensus scripts' .npy layouts, written from a result (CLI files and app downloads alike).

Consensus run (``B`` prompts, ``P`` recorded columns: ``N*L + 1`` unless every k-th layer-step
is recorded, ``T`` the longest prompt, ``D`` the model width):

- ``PREFIX.npy``: float32 ``[B, P]`` the reference metric, column 0 on the embeddings and
  column ``1 + i*L + l`` after block ``l`` of iteration ``i``.
- ``PREFIX_hidden.npy``: float32 ``[B, T, D]`` the final state (after the last final norm).
- eplot file: float32 ``[B, P-1, 2]`` (mean pairwise cosine, mean pairwise raw dot) after each block.
- matrix file: float32 ``[B, T, T, P-1]`` token-by-token cosine matrices after each block.

Prompts shorter than ``T`` are NaN-padded at the end of their token axes, so one file holds
every prompt and ``~np.isnan`` recovers each prompt's own tokens.

Consensus decoding (``K`` new tokens): ``PREFIX.npy`` a numpy unicode array ``[B]`` of the full
texts (prompt + generated, as the GPT-Neo script saved them; no pickle needed to load it) and
``PREFIX_diag.npy`` float32 ``[K*B, P]``, the per-token traces stacked token by token (row
``k*B + b`` is prompt ``b``'s consensus run for new token ``k``), as the script's ``np.vstack``.

A stopped run saves what it computed: consensus arrays cut at the last computed column (rows
of prompts that had not started are NaN), decoding traces of the tokens every prompt finished.

A ``--savefile`` prefix that names a folder (``out/``, or an existing ``out``) writes
``out/consensus.npy`` and its companions: the scripts' ``np.save(PREFIX + ".npy")`` would have
written a hidden ``out/.npy``. Every path is checked (:func:`core.files.check_output`) before the
run starts (:func:`output_paths`).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..errors import LabError
from .results import ConsensusDecodeResult, ConsensusResult
from ..files import atomic_save_npy, check_output

FOLDER_PREFIX = "consensus"  # the file name a --savefile folder gets


def npy_path(name: str | os.PathLike) -> Path:
    """``name`` with ``.npy`` appended unless it has it (what ``np.save`` does)."""
    name = str(name)
    return Path(name if name.endswith(".npy") else name + ".npy")


def prefix_paths(prefix: str | os.PathLike, *suffixes: str) -> list[Path]:
    """``PREFIX{suffix}.npy`` for each suffix; a ``.npy`` typed on the prefix is dropped first, and
    a prefix naming a folder stands for ``FOLDER/consensus``."""
    prefix = str(prefix)
    if prefix.endswith(os.sep) or (prefix.strip() and _is_dir(prefix)):
        prefix = os.path.join(prefix, FOLDER_PREFIX)
    if prefix.endswith(".npy"):
        prefix = prefix[:-4]
    return [Path(f"{prefix}{s}.npy") for s in suffixes]


def _is_dir(path: str) -> bool:
    try:
        return Path(path).expanduser().is_dir()
    except OSError:  # a name the file system cannot even look up (too long): check_output says so
        return False


def output_paths(savefile: str | None, eplot: str | None = None, matrixerror: str | None = None,
                 decode: bool = False) -> list[Path]:
    """Every file a run will write for these flags, each checked before the run starts (an
    empty name, a folder for --eplot/--matrixerror, a parent that is a file, a read-only place,
    a name too long: a sentence now, not a traceback after the run)."""
    paths = []
    if savefile is not None:
        if not str(savefile).strip():
            raise LabError("--savefile needs a file prefix (got an empty one); name one, or drop --savefile.")
        paths += [check_output(p, "--savefile") for p in
                  prefix_paths(savefile, "", "_diag" if decode else "_hidden")]
    for flag, name in (("--eplot", eplot), ("--matrixerror", matrixerror)):
        if name is not None:
            check_output(name, flag)  # the name as typed: a folder is refused, not written beside
            paths.append(check_output(npy_path(name), flag))
    return paths


def metric_array(result: ConsensusResult) -> np.ndarray:
    return np.ascontiguousarray(result.trimmed().metric, dtype=np.float32)


def eplot_array(result: ConsensusResult) -> np.ndarray:
    return np.ascontiguousarray(result.trimmed().eplot, dtype=np.float32)


def matrix_array(result: ConsensusResult) -> np.ndarray:
    if result.matrix is None:
        raise ValueError("this run recorded no cosine matrices (ConsensusConfig.matrix was off)")
    return np.ascontiguousarray(result.trimmed().matrix[..., 1:], dtype=np.float32)


def hidden_array(result: ConsensusResult) -> np.ndarray:
    return np.ascontiguousarray(result.hidden, dtype=np.float32)


def texts_array(result: ConsensusDecodeResult) -> np.ndarray:
    return np.array(result.texts, dtype=np.str_)


def diag_array(result: ConsensusDecodeResult) -> np.ndarray:
    k = result.tokens_done
    traces = result.traces[:, :k]  # (B, k, P)
    return np.ascontiguousarray(traces.transpose(1, 0, 2).reshape(k * traces.shape[0], traces.shape[2]),
                                dtype=np.float32)  # (k*B, P), row k*B + b


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` file of ``array`` in memory (for download buttons)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def save_consensus(result: ConsensusResult, savefile: str | None = None, eplot: str | None = None,
                   matrixerror: str | None = None) -> list[Path]:
    """Write the files asked for, atomically; returns their paths."""
    written = []
    if savefile is not None:
        main, hidden = prefix_paths(savefile, "", "_hidden")
        written += [atomic_save_npy(main, metric_array(result)), atomic_save_npy(hidden, hidden_array(result))]
    if eplot is not None:
        written.append(atomic_save_npy(npy_path(eplot), eplot_array(result)))
    if matrixerror is not None:
        written.append(atomic_save_npy(npy_path(matrixerror), matrix_array(result)))
    return written


def save_decode(result: ConsensusDecodeResult, savefile: str | None) -> list[Path]:
    """Write ``PREFIX.npy`` (texts) and ``PREFIX_diag.npy`` (traces) atomically."""
    if savefile is None:
        return []
    main, diag = prefix_paths(savefile, "", "_diag")
    return [atomic_save_npy(main, texts_array(result)), atomic_save_npy(diag, diag_array(result))]
