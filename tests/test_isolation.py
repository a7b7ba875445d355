"""The suite writes nothing into the checkout: every run and job goes under the session's runs root
(tests/conftest.py's ``isolated_runs_root``), for commands run in this process and in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CHECKOUT

from core.commands.cli import main


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def test_the_runs_root_is_outside_the_checkout(isolated_runs_root):
    root = Path(os.environ["GPTLAB_RUNS"]).resolve()
    assert root == isolated_runs_root.resolve()
    assert CHECKOUT not in root.parents


def test_a_consensus_run_without_a_runs_root_of_its_own_lands_in_the_session_root(
        tiny_gpt2_dir, isolated_runs_root, monkeypatch, capsys):
    monkeypatch.chdir(CHECKOUT)  # where the suite runs from: a relative runs/ would be the checkout's
    before = _listing(CHECKOUT / "runs")
    assert main(["consensus", "--model", str(tiny_gpt2_dir), "--prompt", "The quick brown fox", "--size", "1",
                 "--run-name", "isolation-check"]) == 0
    assert f"kept the run in {isolated_runs_root / 'consensus' / 'isolation-check'}" in capsys.readouterr().err
    assert (isolated_runs_root / "consensus" / "isolation-check" / "status.json").is_file()
    assert _listing(CHECKOUT / "runs") == before


def test_a_subprocess_inherits_the_session_root(tiny_gpt2_dir, isolated_runs_root):
    before = _listing(CHECKOUT / "runs")
    subprocess.run([sys.executable, "-m", "core", "consensus", "--model", str(tiny_gpt2_dir), "--prompt", "fox",
                    "--size", "1", "--run-name", "isolation-subprocess"], cwd=CHECKOUT, check=True,
                   capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(CHECKOUT)})
    assert (isolated_runs_root / "consensus" / "isolation-subprocess" / "status.json").is_file()
    assert _listing(CHECKOUT / "runs") == before
