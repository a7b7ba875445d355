"""Hostile and tired input to the commands, the way a person makes it: every output flag pointed at
a folder, through a file, at a read-only place, with a name too long or empty; bytes on stdin
that are not text; a full disk. Each ends in one sentence and exit 2, before any work is done and
without writing anything, or (stdin) reads what is text."""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core.commands.cli as cli
from core.commands.cli import main
from core.commands.consensus import _read_stdin
from core.commands.generate import read_prompt
from core.errors import LabError
from core.files import atomic_write_json, atomic_write_text, check_output

PROMPT = "Once upon a time"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    assert err.endswith("\n") and "Traceback" not in err and "a bug in GPT Lab" not in err, err
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, err
    return lines[-1]


# -- every flag that writes a file, checked before the work ---------------------------------------------

WRITERS = [  # (command line before the flag, the flag, extra flags after it)
    (["generate", "--prompt", PROMPT, "--max-new-tokens", "2"], "--json"),
    (["consensus", "--prompt", PROMPT, "--size", "1"], "--savefile"),
    (["consensus", "--prompt", PROMPT, "--size", "1"], "--eplot"),
    (["consensus", "--prompt", PROMPT, "--size", "1"], "--matrixerror"),
    (["consensus", "--prompt", PROMPT, "--size", "1", "--use-model", "1"], "--savefile"),
    (["consensus", "--simulate", "--size", "1"], "--eplot"),
    (["consensus", "--simulate", "--size", "1"], "--savefile"),
    (["validate", "--model", "gpt2"], "--json"),
]


def _places(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Where a tired user points an output, and a word the sentence must hold."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    file = tmp_path / "a-file.txt"
    file.write_text("keep me")
    fifo = tmp_path / "a-fifo"  # a device-like file of the test's own: a broken check must never replace /dev/null
    os.mkfifo(fifo)
    places = {
        "folder": (str(folder), "folder"),
        "folder/": (str(folder) + os.sep, "folder"),
        "file as parent": (str(file / "out"), "is a file, not a folder"),
        "file as grandparent": (str(file / "deeper" / "out"), "is a file, not a folder"),
        "name too long": (str(tmp_path / ("n" * 300)), "longer than"),
        "empty": ("", "empty"),
        "device": (str(fifo), "not a regular file"),
    }
    if os.geteuid() == 0:  # root writes through permissions: a pseudo file system refuses it instead
        places["read-only place"] = ("/proc/gptlab-out", "cannot be written")
    else:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        places["read-only place"] = (str(ro / "out"), "permission denied")
    return places


@pytest.mark.parametrize("argv, flag", WRITERS, ids=lambda x: x if isinstance(x, str) else " ".join(x[:2]))
@pytest.mark.parametrize("place", ["folder", "folder/", "file as parent", "file as grandparent", "name too long",
                                   "empty", "device", "read-only place"])
def test_every_output_flag_refuses_an_unwritable_place_before_any_work(capsys, monkeypatch, tmp_path, argv, flag,
                                                                       place):
    path, words = _places(tmp_path)[place]
    if flag == "--savefile" and place in ("folder", "folder/", "device"):
        return  # a --savefile folder writes FOLDER/consensus.npy (tested below); a prefix is no file itself
    before = sorted(p for p in tmp_path.rglob("*"))

    def no_model(*a, **k):
        raise AssertionError("loaded a model before checking where the output goes")

    monkeypatch.setattr(cli, "load_from_args", no_model)
    for module in ("generate", "consensus"):
        monkeypatch.setattr(f"core.commands.{module}.load_from_args", no_model)
    monkeypatch.setattr("core.models.validate.validate_gpt2", no_model)
    rc, out, err = run_cli(capsys, *argv, flag, path)
    line = one_error(err)
    assert rc == 2 and words in line and flag in line, line
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, not even a folder
    assert (tmp_path / "a-file.txt").read_text() == "keep me"


def test_savefile_folder_writes_consensus_npy_inside_it(capsys, tmp_path, tiny_gpt2_dir):
    out = tmp_path / "results"
    out.mkdir()
    for prefix in (str(out), str(out) + os.sep):
        rc, _, err = run_cli(capsys, "consensus", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "--size", "1",
                             "--savefile", prefix)
        assert rc == 0, err
        assert sorted(p.name for p in out.iterdir()) == ["consensus.npy", "consensus_hidden.npy"]
        assert not (out / ".npy").exists()
    new = tmp_path / "new-folder" / ""
    rc, _, err = run_cli(capsys, "consensus", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "--size", "1",
                         "--savefile", str(new) + os.sep)
    assert rc == 0 and np.load(tmp_path / "new-folder" / "consensus.npy").shape[0] == 1


# -- stdin that is not text -------------------------------------------------------------------------------

def _stdin(data: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=64), st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_any_bytes_on_stdin_are_a_prompt_or_a_sentence(data):
    for read in (lambda: read_prompt(None, _stdin(data)), lambda: _read_stdin_from(data)):
        try:
            text = read()
        except LabError as e:
            assert "\n" not in str(e) and ("UTF-8" in str(e) or "empty" in str(e) or "No prompt" in str(e))
            continue
        assert isinstance(text, (str, list))


def _read_stdin_from(data: bytes) -> list[str]:
    import sys

    saved = sys.stdin
    sys.stdin = _stdin(data)
    try:
        return _read_stdin()
    finally:
        sys.stdin = saved


@pytest.mark.parametrize("command", [["generate", "--max-new-tokens", "1"], ["consensus", "--size", "1"]])
def test_non_utf8_stdin_is_one_sentence_exit_2(capsys, monkeypatch, tiny_gpt2_dir, command):
    monkeypatch.setattr("sys.stdin", _stdin(b"ROMEO \xff\xfe but soft"))
    rc, _, err = run_cli(capsys, *command, "--model", tiny_gpt2_dir)
    line = one_error(err)
    assert rc == 2 and "not UTF-8" in line and "0xff" in line and "offset 6" in line


def test_crlf_and_lone_cr_on_stdin_are_line_breaks(monkeypatch):
    assert read_prompt(None, _stdin(b"a\r\nb\r\n")) == "a\nb"
    monkeypatch.setattr("sys.stdin", _stdin(b"one\r\ntwo\rthree\n\n"))
    assert _read_stdin() == ["one", "two", "three"]


# -- writes that meet a full disk -------------------------------------------------------------------------

def test_a_full_disk_names_the_folder_and_the_space_left(tmp_path, monkeypatch):
    target = tmp_path / "out" / "result.json"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LabError, match=r"The disk holding .*out is full \(.* free\); free some space") as e:
        atomic_write_json(target, {"a": 1})
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # the temp file is gone too
    monkeypatch.undo()
    atomic_write_text(target, "fits")
    assert target.read_text() == "fits"


def test_check_output_keeps_ordinary_paths(tmp_path):
    assert check_output(None, "--json") is None
    assert check_output(tmp_path / "new" / "deeper" / "x.json", "--json") == tmp_path / "new" / "deeper" / "x.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    existing = tmp_path / "old.json"
    existing.write_text(json.dumps({}))
    assert check_output(existing, "--json") == existing  # replaced atomically later, not refused


@pytest.mark.parametrize("command", [["generate", "--prompt"], ["consensus", "--prompt"], ["generate", "--json"]])
def test_arguments_that_are_not_utf8_are_one_sentence(capsys, command):
    undecodable = b"ROMEO \xff".decode("utf-8", "surrogateescape")  # how Python hands over such argv bytes
    rc, _, err = run_cli(capsys, *command, undecodable)
    assert rc == 2 and "is not UTF-8 text (byte 0xff)" in one_error(err)
