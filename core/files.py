"""Files: atomic writes, output paths checked before the work, and reading inside a model folder.

- Atomic writes: a temp file in the same folder, fsync, then rename. A crash mid-write leaves the
  previous file intact, never a truncated one; a full disk is a sentence naming the folder and
  the space left, not an ``OSError`` from deep inside numpy.
- :func:`check_output`: every command that writes a file asks it about the path *before* the
  work starts, so an hour-long run never ends in "cannot write there".
- :func:`check_output_place`: the same for a folder a command creates or fills (``--output-dir``,
  ``--data-cache``), before the work; what it may already hold is the caller's to judge.
- :func:`check_output_dir`: stricter, for a folder a command writes whole (``export --to``): new or
  empty, never one that holds anything. :func:`atomic_folder` fills it so it appears whole or not at all.
- :func:`check_folder_links`: a model, run or transcoder-set folder is read only inside itself; a
  file that is a link out of it (a ``README.md`` pointing at ``/etc/shadow``) is refused, never followed.
- :func:`parse_json`: ``json.loads`` for files GPT Lab did not necessarily write: JSON nested too
  deeply for the parser is malformed JSON like any other (a ``ValueError``), not a RecursionError.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import LabError, fmt_bytes, shorten

_UMASK = os.umask(0)
os.umask(_UMASK)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(folder: Path, e: OSError) -> LabError:
    try:
        free = f"{fmt_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "no free space that can be told"
    return LabError(f"The disk holding {folder} is full ({free}); free some space there or write somewhere else.")


def parse_json(text: str | bytes) -> Any:
    """``json.loads(text)``, except that nesting too deep for Python's parser (a hostile
    ``[[[[...]]]]``) raises :class:`json.JSONDecodeError` like any other malformed JSON, so every
    reader that refuses bad JSON in a sentence refuses this one too."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move the result onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=".tmp")
    except OSError as e:
        if e.errno in _FULL:
            raise _disk_full(path.parent, e) from e
        raise
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _FULL:
            raise _disk_full(path.parent, e) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, _w)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, _w)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_npy(path: str | os.PathLike, array) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, _w)


# -- output paths, checked before the work ----------------------------------------------------------

def name_too_long(path: str | os.PathLike) -> str | None:
    """A sentence-part when some part of ``path`` is longer than the file system allows, else None."""
    out = Path(os.fspath(path)).expanduser().absolute()
    try:
        name_max = os.pathconf(_nearest_existing(out.parent), "PC_NAME_MAX")
    except OSError:
        name_max = 255
    parts = [out.name] + [p.name for p in out.parents]
    long = next((p for p in parts if len(os.fsencode(p)) > name_max), None)
    if long is None:
        return None
    return f"the name '{shorten(long, 40)}' is longer than the {name_max} bytes the file system allows"


def _os_reason(e: OSError) -> str:
    return {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "the file system is read-only", errno.ENAMETOOLONG: "the name is too long",
            errno.ENOTDIR: "part of the way is a file, not a folder",
            errno.ENOENT: "that folder takes no new files"}.get(e.errno, e.strerror or str(e))


def _check_place(out: Path, flag: str, shown: str, probe_in: Path) -> None:
    """Every existing part of the way to ``out`` is a folder, and the nearest existing one
    (``probe_in`` when it exists) takes a new file: probed with a real temp file, so a read-only
    mount or a folder that is not yours fails here. Leaves nothing behind."""
    existing = _nearest_existing(probe_in)
    if not existing.is_dir():
        raise LabError(f"{flag} {shown} cannot be written: {existing} is a file, not a folder; pick another "
                       f"place.")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".gptlab-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in _FULL:
            raise _disk_full(existing, e) from None
        raise LabError(f"{flag} {shown} cannot be written ({_os_reason(e)}); pick a folder you can write to.") \
            from None


def check_output(path: str | os.PathLike | None, flag: str) -> Path | None:
    """The file ``flag`` (``--json``, ``--eplot`` ...) names, checked before any work: a name is
    given, it is not a folder, every existing part of its way is a folder, the nearest existing
    one takes a new file (probed with a real temp file, so a read-only mount or a folder that is
    not yours fails here), and no part of the name is longer than the file system allows.
    ``None`` (the flag was not given) passes through. Writes nothing that stays."""
    def is_a_file(text: str, out: Path, shown: str) -> Path:
        if text.endswith(os.sep) or out.is_dir():
            raise LabError(f"{flag} {shown} is a folder; name a file inside it, e.g. "
                           f"{os.path.join(shorten(text, 80), 'out')}.")
        if out.exists() and not out.is_file():
            raise LabError(f"{flag} {shown} exists and is not a regular file; name a new or ordinary file.")
        return out.absolute().parent  # where the file is made

    return _check_writable(path, flag, "a file name", "name the file to write", is_a_file)


def check_output_place(path: str | os.PathLike | None, flag: str) -> Path | None:
    """The folder ``flag`` (``--output-dir``, ``--data-cache`` ...) names, checked before any work
    the way :func:`check_output` checks a file: a name is given and fits the file system, it is a
    folder or does not exist yet, every existing part of its way is a folder, and the folder (or
    its nearest existing parent) takes a new file. What the folder may already hold is for the
    caller to judge. ``None`` passes through; writes nothing that stays."""
    def is_a_folder(text: str, out: Path, shown: str) -> Path:
        if out.exists() and not out.is_dir():
            kind = "a file" if out.is_file() else "not a folder"
            raise LabError(f"{flag} {shown} is {kind}; name a folder (a new one is made).")
        return out.absolute()  # the folder itself, or where it is made

    return _check_writable(path, flag, "a folder name", "name the folder", is_a_folder)


def _check_writable(path: str | os.PathLike | None, flag: str, what: str, remedy: str,
                    judge: Callable[[str, Path, str], Path]) -> Path | None:
    """What :func:`check_output` and :func:`check_output_place` share: a name is given and fits the
    file system, ``judge(text, path, shown)`` refuses the wrong kind of thing and says where to probe,
    the place takes a new file, and an ``OSError`` on the way is one sentence (a full disk named)."""
    if path is None:
        return None
    text = os.fspath(path)
    if not text.strip():
        raise LabError(f"{flag} needs {what} (got an empty one); {remedy}, or drop {flag}.")
    shown = shorten(text, 120)
    out = Path(text).expanduser()
    place = out.absolute()
    try:
        long = name_too_long(out)
        if long is not None:
            raise LabError(f"{flag}: {long}; use a shorter name.")
        place = judge(text, out, shown)
        _check_place(out, flag, shown, place)
    except LabError:
        raise
    except OSError as e:
        if e.errno in _FULL:
            raise _disk_full(place, e) from None
        raise LabError(f"{flag} {shown} cannot be written ({_os_reason(e)}); pick a folder you can write to.") from None
    return out


def check_output_dir(path: str | os.PathLike | None, flag: str) -> Path:
    """The folder ``flag`` (``--to`` ...) names, checked before any work: a name is given, it is
    new or an empty folder (never a file, a link, or a folder holding anything: a model folder is
    never overwritten), no part of the name is longer than the file system allows, and the nearest
    existing folder on its way takes a new folder (probed with a real one). Writes nothing that
    stays; fill it with :func:`atomic_folder`."""
    text = "" if path is None else os.fspath(path)
    if not text.strip():
        raise LabError(f"{flag} needs a folder name (got an empty one); name a new or empty folder to write.")
    shown = shorten(text, 120)
    out = Path(text).expanduser()
    try:
        name_max = os.pathconf(_nearest_existing(out.absolute().parent), "PC_NAME_MAX")
        long = next((p for p in [out.name, *(q.name for q in out.absolute().parents)]
                     if len(os.fsencode(p)) > name_max), None)
        if long is not None:
            raise LabError(f"{flag}: the name '{shorten(long, 40)}' is longer than the {name_max} bytes the file "
                           f"system allows; use a shorter name.")
        if out.is_symlink():
            raise LabError(f"{flag} {shown} is a link; name a new or empty folder, not a link to one.")
        here, absolute = Path.cwd(), Path(os.path.abspath(out))
        if absolute == here or absolute in here.parents:
            raise LabError(f"{flag} {shown} is the working folder or holds it; name a new or empty folder inside "
                           f"it instead, e.g. {flag} exported.")
        if out.exists() and not out.is_dir():
            raise LabError(f"{flag} {shown} is a file; name a new or empty folder.")
        if out.is_dir():
            held = sorted(p.name for p in out.iterdir())
            if held:
                what = "a model folder (it holds config.json)" if "config.json" in held else \
                    f"not empty (it holds {shorten(', '.join(held[:3]), 60)}{', ...' if len(held) > 3 else ''})"
                raise LabError(f"{flag} {shown} is {what}; name a new or empty folder, nothing is ever written "
                               f"over an existing one.")
        existing = _nearest_existing(out.absolute().parent)  # where the finished folder is renamed into
        if not existing.is_dir():
            raise LabError(f"{flag} {shown} cannot be made: {existing} is a file, not a folder; pick another place.")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".gptlab-probe-"))
    except LabError:
        raise
    except OSError as e:
        if e.errno in _FULL:
            raise _disk_full(_nearest_existing(out.absolute()), e) from None
        reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "the file system is read-only", errno.ENAMETOOLONG: "the name is too long",
                  errno.ENOTDIR: "part of the way is a file, not a folder"}.get(e.errno, e.strerror or str(e))
        raise LabError(f"{flag} {shown} cannot be written ({reason}); pick a folder you can write to.") from None
    return out


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp folder beside ``path`` to fill; when the block ends, its files are
    synced and the folder renamed onto ``path`` (absent or an empty folder: checked first with
    :func:`check_output_dir`), so ``path`` appears complete or not at all. If the block fails,
    the temp folder is removed and ``path`` is left as it was."""
    out = Path(os.path.abspath(Path(path).expanduser()))  # "a/.." is judged as the folder it names
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name[:200]}.", suffix=".tmp"))
    except OSError as e:
        if e.errno in _FULL:
            raise _disk_full(parent, e) from e
        raise
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                os.chmod(file, file.stat().st_mode & 0o7777 | 0o666 & ~_UMASK)  # some writers make 0600
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder ordinary permissions
        try:
            os.replace(tmp, out)  # atomic; replaces an empty folder, refuses anything else
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise LabError(f"{shorten(str(out), 120)} was filled by something else while it was being written; "
                               f"name a new or empty folder and run again.") from None
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _FULL:
            raise _disk_full(parent, e) from e
        raise


def _nearest_existing(folder: Path) -> Path:
    """``folder`` or its closest ancestor that exists (a file, if the way runs into one); a part
    the file system cannot even look up (a name too long) counts as missing."""
    while folder != folder.parent:
        try:
            if folder.exists():
                break
        except OSError:
            pass
        folder = folder.parent
    return folder


# -- reading inside a model folder ------------------------------------------------------------------

def allowed_roots(folder: Path) -> list[Path]:
    """Where the files of the model folder ``folder`` may live: the folder itself, and for a
    Hugging Face cache snapshot (``.../snapshots/<rev>``, whose files are links into the
    repository's ``blobs``) that repository folder."""
    folder = folder.resolve()
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent)
    return roots


def link_out_of(folder: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(entry, target)`` for the first entry of ``folder`` that is a symbolic link leading out of
    it (see :func:`allowed_roots`), or None. OSError when the folder cannot be listed."""
    root = Path(folder).resolve()
    roots = allowed_roots(root)
    for entry in sorted(root.iterdir()):
        if not entry.is_symlink():
            continue
        target = entry.resolve()
        if not any(target == r or target.is_relative_to(r) for r in roots):
            return entry, target
    return None


def check_folder_links(folder: str | os.PathLike, what: str = "model") -> Path:
    """``folder`` resolved, after refusing it when one of its files is a link leading out of it
    (see :func:`allowed_roots`): a model card, config, weights or tokenizer (or a run's log, a
    transcoder set's weights and feature store: ``what`` names the kind of folder) is read only
    from inside the folder, never from wherever a link points."""
    root = Path(folder).resolve()
    try:
        found = link_out_of(root)
    except OSError as e:
        raise LabError(f"Cannot read the {what} folder {root} ({e.strerror or e}); check its permissions.") from None
    if found is not None:
        entry, target = found
        raise LabError(f"{entry} is a link to {shorten(str(target), 80)}, outside the {what} folder; GPT Lab "
                       f"reads a {what} only from inside its folder, so copy that file in instead of linking it.")
    return root


def read_text_inside(folder: str | os.PathLike, name: str, what: str = "model") -> str | None:
    """The text of ``folder/name`` when it is a file inside the ``what`` folder (``None`` when it
    is absent), read as UTF-8 with undecodable bytes replaced; a link out of the folder is refused."""
    root = check_folder_links(folder, what)
    path = root / name
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace")


def new_numbered_folder(root: Path, base: str, what: str, remedy: str) -> Path:
    """``root/base`` created here, or ``base-2``, ``base-3``, ... when taken, so two writers that
    start in the same second never share a folder (``mkdir`` is the claim: it fails when another got
    there first). ``root`` is made as needed. After 10,000 taken names, a LabError: "Could not find a
    free ``what`` name under ``root``; ``remedy``"."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = root / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise LabError(f"Could not find a free {what} name under {root}; {remedy}.")
