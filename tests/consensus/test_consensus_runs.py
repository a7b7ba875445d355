"""Consensus run folders (core.consensus.runs): what `python -m core consensus` keeps, that a
reopened run equals the engine's result, that a stopped, failed or killed run keeps what it
computed, background runs through core/jobs, and delete."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from tests.conftest import kill_process_groups, wait_for

from core.commands.cli import main
from core.consensus import runs
from core.consensus.engine import ConsensusConfig, DecodeConfig, Progress, Started, consensus_decode, \
    consensus_stream, run_consensus
from core.consensus.results import STAT_NAMES
from core.consensus.simulation import SimulationConfig, run_simulation
from core.errors import LabError
from core.jobs.folder import MARKER_FILE
from core.models.loading import load_model

A = "ROMEO: But soft, what light through yonder window breaks?"
B = "The quick brown fox"


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


@pytest.fixture
def jobs():
    """Background runs started by a test are killed after it."""
    before = set(runs._CHILDREN)
    yield
    kill_process_groups({p.pid: p for f, p in list(runs._CHILDREN.items()) if f not in before})


def cli(*args, capsys=None) -> int:
    code = main(["consensus", *args])
    if capsys is not None:
        capsys.readouterr()
    return code


def test_the_cli_keeps_every_run_in_a_folder_of_the_scripts_layouts(tiny_gpt2_dir, lm, tmp_path, runs_dir, capsys):
    N, L = 3, lm.stack.n_layer
    assert cli("--model", str(tiny_gpt2_dir), "--prompt", A, "--prompt", B, "--size", str(N), "--decode", "0,2",
               "--savefile", str(tmp_path / "s"), "--matrixerror", str(tmp_path / "m.npy"), "--run-name", "first") == 0
    err = capsys.readouterr().err
    folder = runs_dir / "consensus" / "first"
    assert f"kept the run in {folder}" in err
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MARKER_FILE, "config.json", "status.json", "events.jsonl", "prompts.json", "token_ids.npy", "steps.npy",
         "steps_done.npy", "decodings.json", "consensus.npy", "consensus_hidden.npy", "consensus_eplot.npy",
         "consensus_matrix.npy", "consensus_matrix0.npy"] + [f"stat_{n}.npy" for n in STAT_NAMES])
    expected = run_consensus(lm, [A, B], ConsensusConfig(iterations=N, matrix=True, decode_iterations=(0, 2)))
    # the scripts' layouts, the same bytes as the files asked for
    np.testing.assert_array_equal(np.load(folder / "consensus.npy"), np.load(tmp_path / "s.npy"))
    np.testing.assert_array_equal(np.load(folder / "consensus_hidden.npy"), np.load(tmp_path / "s_hidden.npy"))
    np.testing.assert_array_equal(np.load(folder / "consensus_matrix.npy"), np.load(tmp_path / "m.npy"))
    assert np.load(folder / "consensus.npy").shape == (2, N * L + 1)
    assert np.load(folder / "consensus_eplot.npy").shape == (2, N * L, 2)
    np.testing.assert_allclose(np.load(folder / "consensus.npy"), expected.metric, atol=1e-6)
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["kind"], cfg["model"], cfg["prompts"]) == ("run", str(tiny_gpt2_dir), {"source": "typed", "texts": [A, B]})
    assert cfg["consensus"]["iterations"] == N and cfg["consensus"]["decode_iterations"] == [0, 2]
    assert cfg["n_layer"] == L
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "finished" and status["done"] == status["total"] == 2 * N * L
    assert status["device"] == "cpu" and status["seconds"] > 0

    info, result = runs.load_run("first")
    assert (info.kind, info.state, info.prompts, info.label) == ("run", "finished", 2, f"{tiny_gpt2_dir} N=3")
    for name in STAT_NAMES:
        np.testing.assert_allclose(result.series(name), expected.series(name), rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(result.matrix, expected.matrix, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(result.hidden, expected.hidden, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(result.steps, expected.steps)
    assert result.token_ids == expected.token_ids and result.prompts == expected.prompts
    assert result.decodings == expected.decodings and result.n_layer == L and result.complete


def test_run_names_a_timestamp_by_default_a_taken_name_is_refused_and_no_run_folder_opts_out(
        tiny_gpt2_dir, runs_dir, capsys):
    args = ["--model", str(tiny_gpt2_dir), "--prompt", B, "--size", "1"]
    assert cli(*args, capsys=capsys) == 0
    (made,) = [p.name for p in (runs_dir / "consensus").iterdir()]
    assert len(made) == 15 and made[8] == "-" and made.replace("-", "").isdigit()  # YYYYmmdd-HHMMSS
    assert cli(*args, "--run-name", "mine", capsys=capsys) == 0
    assert cli(*args, "--run-name", "mine") == 2
    assert "already holds a consensus run; pick another --run-name" in capsys.readouterr().err
    capsys.readouterr()
    assert cli(*args, "--run-name", "bad name") == 2
    assert "Run name 'bad name' is not allowed" in capsys.readouterr().err
    assert cli(*args, "--no-run-folder", "--run-name", "x") == 2
    assert "drop one of them" in capsys.readouterr().err
    before = sorted(p.name for p in (runs_dir / "consensus").iterdir())
    assert cli(*args, "--no-run-folder", capsys=capsys) == 0
    assert sorted(p.name for p in (runs_dir / "consensus").iterdir()) == before == sorted([made, "mine"])


def test_decoding_and_simulation_runs_are_kept_and_reopened(tiny_gpt2_dir, lm, tmp_path, runs_dir, capsys):
    assert cli("--model", str(tiny_gpt2_dir), "--prompt", B, "--size", "2", "--use-model", "3", "--seed", "5",
               "--savefile", str(tmp_path / "d"), "--run-name", "dec", capsys=capsys) == 0
    folder = runs_dir / "consensus" / "dec"
    np.testing.assert_array_equal(np.load(folder / "consensus.npy"), np.load(tmp_path / "d.npy"))
    np.testing.assert_array_equal(np.load(folder / "consensus_diag.npy"), np.load(tmp_path / "d_diag.npy"))
    expected = consensus_decode(lm, [B], ConsensusConfig(iterations=2), DecodeConfig(new_tokens=3, seed=5))
    info, result = runs.load_run("dec")
    assert info.kind == "decode" and result.texts == expected.texts and result.new_ids == expected.new_ids
    np.testing.assert_allclose(result.traces, expected.traces, atol=1e-6)
    assert result.decode.new_tokens == 3 and result.complete

    assert cli("--simulate", "--size", "30", "--tokens", "6", "--dim", "4", "--run-name", "sim", capsys=capsys) == 0
    info, result = runs.load_run("sim")
    sim = run_simulation(SimulationConfig(steps=30, tokens=6, dim=4))
    assert info.kind == "sim" and info.model is None and type(result).__name__ == "SimulationResult"
    np.testing.assert_allclose(result.metric, sim.metric, atol=1e-6)
    np.testing.assert_allclose(result.mean_cosine, sim.mean_cosine, atol=1e-6)
    assert result.simulation.tokens == 6 and result.total_steps == 30
    assert cli("--config", str(runs_dir / "consensus" / "sim" / "config.json"), "--run-name", "sim2",
               capsys=capsys) == 0
    np.testing.assert_array_equal(runs.load_run("sim2")[1].metric, result.metric)


def test_config_runs_a_saved_run_again_with_the_same_numbers(tiny_gpt2_dir, runs_dir, capsys):
    assert cli("--model", str(tiny_gpt2_dir), "--randomprompt", "2", "6", "--size", "2", "--noff",
               "--run-name", "one", capsys=capsys) == 0
    assert cli("--config", str(runs_dir / "consensus" / "one" / "config.json"), "--run-name", "two",
               capsys=capsys) == 0
    a, b = runs.load_run("one")[1], runs.load_run("two")[1]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 2 and a.config.skip_mlp and b.config.skip_mlp
    np.testing.assert_array_equal(a.metric, b.metric)
    assert json.loads((runs_dir / "consensus" / "two" / "config.json").read_text())["model"] == str(tiny_gpt2_dir)
    assert cli("--config", str(runs_dir / "nothing.json")) == 2
    assert "--config takes a consensus run's config.json" in capsys.readouterr().err


def test_a_stopped_run_keeps_what_it_computed(lm, runs_dir):
    cfg = ConsensusConfig(iterations=50, max_events=200)
    writer = runs.RunWriter.create(runs.run_config("run", "tiny", {"source": "typed", "texts": [A]}, cfg), "stopped")
    events = writer.watch(consensus_stream(lm, [A], cfg))
    started = next(events)
    assert isinstance(started, Started) and started.info["run"] == "stopped"
    seen = 0
    for ev in events:
        seen += isinstance(ev, Progress)
        if seen == 3:
            break
    events.close()  # what a Stop does
    live = started.result
    info, result = runs.load_run("stopped")
    assert info.state == "stopped" and "what it had computed is kept" in info.reason
    p = live.columns_done
    assert 0 < p < len(live.steps) and result.metric.shape == (1, p)
    np.testing.assert_array_equal(result.metric, live.metric[:, :p])
    assert np.load(runs_dir / "consensus" / "stopped" / "consensus.npy").shape == (1, p)
    assert info.done == int(live.steps_done.max()) and info.total == 50 * lm.stack.n_layer


def test_a_failed_run_says_why_and_keeps_its_arrays(lm):
    cfg = ConsensusConfig(iterations=4, max_events=100)

    def failing():
        events = consensus_stream(lm, [B], cfg)
        for ev in events:
            yield ev
            if isinstance(ev, Progress):
                raise LabError("The states stopped being numbers; lower the iterations.")

    writer = runs.RunWriter.create(runs.run_config("run", "tiny", {"source": "typed", "texts": [B]}, cfg), "failing")
    with pytest.raises(LabError):
        for _ in writer.watch(failing()):
            pass
    info, result = runs.load_run("failing")
    assert info.state == "failed" and info.reason == "The states stopped being numbers; lower the iterations."
    assert result.columns_done >= 1 and np.isfinite(result.metric[:, :result.columns_done]).all()
    errors = [json.loads(x) for x in (info.path / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "error" and e["message"] == info.reason for e in errors)


def test_a_background_run_goes_on_alone_stops_on_request_and_a_killed_one_keeps_its_last_arrays(
        tiny_gptlab_dir, jobs):
    config = runs.run_config("run", str(tiny_gptlab_dir), {"source": "typed", "texts": [B]},
                             ConsensusConfig(iterations=200_000, record_every=100), label="long")
    for name, how in (("to-stop", "stop"), ("to-kill", "kill")):
        info = runs.launch(config, run=name, device="cpu")
        assert info.running and (info.path / "console.txt").exists()
        wait_for(lambda: (info.path / "steps.npy").exists(), timeout=120)  # the first flush
        wait_for(lambda: (runs.run_info(name).done or 0) >= 500, timeout=120)  # a few recorded columns
        if how == "stop":
            runs.stop(name)
            wait_for(lambda: not runs.run_info(name).running, timeout=60)
            assert runs.run_info(name).state == "stopped"
        else:
            os.killpg(runs.run_info(name).pid, signal.SIGKILL)
            wait_for(lambda: not runs.run_info(name).running, timeout=60)
            after = runs.run_info(name)
            assert after.state == "failed" and "ended without reporting" in after.reason
        info, result = runs.load_run(name)
        p = result.columns_done
        assert p >= 2 and result.metric.shape == (1, p) and np.isfinite(result.metric).all()
        assert info.label == "long" and not result.complete


def test_list_delete_and_damaged_runs(tiny_gpt2_dir, runs_dir, tmp_path, capsys):
    for name in ("r1", "r2"):
        assert cli("--model", str(tiny_gpt2_dir), "--prompt", B, "--size", "1", "--run-name", name,
                   capsys=capsys) == 0
    assert [r.name for r in runs.list_runs()] == ["r2", "r1"]
    (runs_dir / "consensus" / "r1" / "status.json").write_text("{broken")
    (runs_dir / "consensus" / "stray").mkdir()  # no marker: not a run
    listed = {r.name: r for r in runs.list_runs()}
    assert set(listed) == {"r1", "r2"} and listed["r1"].state == "unreadable"
    with pytest.raises(LabError, match="not a consensus run GPT Lab made"):
        runs.delete("stray")
    with pytest.raises(LabError, match="not a consensus run GPT Lab made"):
        runs.delete(str(tmp_path))
    runs.delete("r1")
    assert [r.name for r in runs.list_runs()] == ["r2"] and (runs_dir / "consensus" / "stray").is_dir()
    with pytest.raises(LabError, match="Run r2 is running"):
        busy = runs_dir / "consensus" / "r2" / "status.json"
        busy.write_text(json.dumps({**json.loads(busy.read_text()), "state": "running", "pid": os.getpid(),
                                    "pid_start": runs.process_start(os.getpid())}))
        runs.delete("r2")
    assert (runs_dir / "consensus" / "r2").is_dir()
    assert not any(p.name == "runs" for p in tmp_path.iterdir())


def test_a_runs_folder_that_cannot_be_written_is_named_before_any_work(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GPTLAB_RUNS", str(blocker))
    assert cli("--model", "no-such-model", "--prompt", B, "--size", "1") == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert "--run-name" in err and "pass --no-run-folder to keep no run folder" in err
    assert cli("--model", str(tiny_gpt2_dir), "--prompt", B, "--size", "1", "--no-run-folder", capsys=capsys) == 0
