"""core.files' output folders: check_output_dir refuses anything but a new or empty folder before
any work, and atomic_folder makes a folder appear whole or not at all."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from core.errors import LabError
from core.files import atomic_folder, check_output_dir


def test_a_new_or_empty_folder_passes_and_nothing_stays(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b", "--to") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "--to") == tmp_path / "empty"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("make, words", [
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "is a model folder"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "is not empty (it holds notes.txt)"),
    (lambda p: p.write_text("a file"), "is a file"),
    (lambda p: p.symlink_to(p.parent), "is a link"),
])
def test_anything_else_is_refused_in_one_sentence(tmp_path, make, words):
    target = tmp_path / "out"
    make(target)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(LabError, match="--to") as e:
        check_output_dir(target, "--to")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before


def test_the_working_folder_is_never_the_output(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for name in (".", "..", "sub/..", str(tmp_path / "here")):
        with pytest.raises(LabError, match="is the working folder or holds it"):
            check_output_dir(name, "--to")
    assert check_output_dir("sub/../new", "--to") == Path("sub/../new")


def test_empty_name_too_long_name_and_a_file_on_the_way(tmp_path):
    with pytest.raises(LabError, match="needs a folder name"):
        check_output_dir("  ", "--to")
    with pytest.raises(LabError, match="longer than"):
        check_output_dir(tmp_path / ("x" * 300), "--to")
    (tmp_path / "f").write_text("")
    with pytest.raises(LabError, match="is a file, not a folder|part of the way is a file"):
        check_output_dir(tmp_path / "f" / "out", "--to")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_place_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LabError, match="permission denied"):
            check_output_dir(ro / "out", "--to")
    finally:
        ro.chmod(0o700)


def test_atomic_folder_appears_whole_with_ordinary_permissions(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_folder(out) as tmp:
        assert not out.exists() and tmp.parent == out.parent
        (tmp / "a.json").write_text("{}")
        fd = os.open(tmp / "secret", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "secret"]
    assert stat.S_IMODE((out / "secret").stat().st_mode) & 0o044  # readable like any other file
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temp folder left


def test_atomic_folder_replaces_an_empty_folder_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_folder(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with atomic_folder(fresh) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("killed mid-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_never_replaces_a_folder_filled_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LabError, match="filled by something else"):
        with atomic_folder(out) as tmp:
            (tmp / "ours").write_text("1")
            out.mkdir()
            (out / "theirs").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_new_numbered_folders_never_share_a_name(tmp_path):
    from core.errors import LabError
    from core.files import new_numbered_folder

    root = tmp_path / "made" / "here"
    made = [new_numbered_folder(root, "20260101-120000", "run", "pick one with --run-name") for _ in range(3)]
    assert [p.name for p in made] == ["20260101-120000", "20260101-120000-2", "20260101-120000-3"]
    assert all(p.is_dir() and p.parent == root for p in made)
    (root / "x").mkdir()
    for n in range(2, 10_000):
        (root / f"x-{n}").mkdir()
    with pytest.raises(LabError, match=r"^Could not find a free job name under .*; delete old jobs there\.$"):
        new_numbered_folder(root, "x", "job", "delete old jobs there")
