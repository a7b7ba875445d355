"""Consensus runs stay inside their memory budget and never return nonsense quietly: the budget
covers every allocation (prompts, batches, device buffers, recordings) and is checked before any
of it is made; absurd sizes and budgets are sentences; states that stop being numbers end the run
with a sentence and keep what came before."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.commands.cli import main
from core.consensus.config import MAX_MEMORY_BUDGET, ConsensusConfig, SimulationConfig
from core.consensus.engine import Finished, Progress, Started, consensus_stream, memory_plan, run_consensus
from core.consensus.simulation import run_simulation, simulation_stream
from core.errors import LabError
from core.models.gpt import GPT, GPTConfig
from core.models.loading import load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 ** 2


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


# -- the budget covers the whole run ------------------------------------------------------------------

def test_many_prompts_run_in_batches_that_fit_the_budget(gpt2):
    prompts = [f"prompt {i} here" for i in range(3000)]
    ids = [gpt2.tokenizer.encode(p) for p in prompts]
    cfg = ConsensusConfig(iterations=1, decode_iterations=(0,), memory_budget=16 * MB)
    plan = memory_plan(gpt2, ids, cfg, texts=prompts)
    assert plan.total <= cfg.memory_budget and 1 <= plan.batch < 3000
    roomy = memory_plan(gpt2, ids, ConsensusConfig(iterations=1, decode_iterations=(0,)), texts=prompts)
    assert roomy.batch > plan.batch and roomy.working > plan.working  # the budget, not the prompts, sets the batch
    events = consensus_stream(gpt2, prompts, cfg)
    started = next(events)
    assert max(len(g) for g in started.info["groups"]) <= plan.batch and started.info["bytes"] == plan.total
    result = [e for e in events if isinstance(e, Finished)][0].result
    assert result.complete and np.isfinite(result.metric).all()
    assert all(t is not None for t in result.decodings[0])
    # the same numbers as one unbatched run of a few of them
    few = run_consensus(gpt2, prompts[:5], ConsensusConfig(iterations=1))
    np.testing.assert_allclose(result.metric[:5], few.metric, rtol=1e-4, atol=1e-5)


PEAK = """
import json, resource, sys
import torch
torch.set_num_threads(1)
from core.models.loading import load_model
from core.consensus.engine import ConsensusConfig, run_consensus
lm = load_model("default")
prompts = [f"Prompt number {i} says hello" for i in range(int(sys.argv[1]))]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cfg = ConsensusConfig(iterations=1, decode_iterations=(0,), memory_budget=int(sys.argv[2]))
run_consensus(lm, prompts, cfg)
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_a_real_run_peaks_inside_its_budget():
    """4,000 prompts with logit-lens decodings (a vocabulary-wide row per token: about 3 GB at
    once unbatched) under a 256 MB budget, measured as the process's peak resident memory."""
    budget = 256 * MB
    proc = subprocess.run([sys.executable, "-c", PEAK, "4000", str(budget)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["peak"] - seen["base"] <= budget, (seen["peak"] - seen["base"]) / MB


def test_huge_sizes_plan_without_allocating_per_step(gpt2):
    cfg = ConsensusConfig(iterations=10**9, record_every=10**9)
    events = consensus_stream(gpt2, ["hi there"], cfg)  # was a MemoryError: a table of every layer-step
    started = next(events)
    assert isinstance(started, Started) and started.result.steps.tolist() == [0, 10**9, 2 * 10**9, 3 * 10**9]
    assert isinstance(next(events), Progress)
    events.close()


@pytest.mark.parametrize("argv, words", [
    (["--memory-budget", "1e300"], "--memory-budget must be in (0"),
    (["--memory-budget", "nan"], "--memory-budget must be a finite number"),
    (["--memory-budget", "0"], "--memory-budget must be in (0"),
    (["--size", "1.5e0"], "--size: invalid int value"),
    (["--size", "1e9"], "(--record-every "),  # a billion, as typed: refused only for its recording's memory
    (["--size", "1000000000", "--record-every", "1", "--memory-budget", "2"], "(--record-every "),
])
def test_absurd_budgets_and_sizes_are_one_sentence(capsys, tiny_gpt2_dir, argv, words):
    rc, _, err = run_cli(capsys, "consensus", "--model", tiny_gpt2_dir, "--prompt", "hi there", *argv)
    assert rc == 2 and words in err.splitlines()[-1] and "Traceback" not in err


def test_budget_limits_in_the_config():
    for budget in (0, -1, MAX_MEMORY_BUDGET + 1, float("inf"), float("nan"), "2"):
        with pytest.raises(LabError, match="memory budget must be above 0"):
            ConsensusConfig(memory_budget=budget).check()
        with pytest.raises(LabError, match="memory budget must be above 0"):
            SimulationConfig(memory_budget=budget).check()
    ConsensusConfig(memory_budget=MAX_MEMORY_BUDGET).check()


def test_one_prompt_too_big_for_the_budget_says_so(gpt2):
    with pytest.raises(LabError, match=r"One batch of prompts of \d+ tokens needs about .* over the .* memory budget"):
        consensus_stream(gpt2, ["a fairly long prompt " * 3], ConsensusConfig(iterations=1, memory_budget=20_000))


# -- numbers, or a sentence -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, at", [(dict(dt=1e30, integrator="euler"), 2), (dict(dt=1e300, beta=1e300), 1)])
def test_a_simulation_that_leaves_the_numbers_stops_with_a_sentence_and_keeps_the_rest(kw, at):
    with pytest.raises(LabError, match=rf"stopped being numbers \(NaN or infinity\) by step {at}: .* use a smaller "
                                       rf"dt or beta\. The steps before it are kept\.") as e:
        run_simulation(SimulationConfig(steps=50, **kw))
    kept = e.value.result.trimmed()
    assert kept.columns_done == at and np.isfinite(kept.metric).all()


def test_the_cli_simulation_that_blows_up_exits_2_and_writes_what_it_kept(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "consensus", "--simulate", "--size", "50", "--dt", "1e30", "--integrator", "euler",
                         "--savefile", tmp_path / "sim")
    assert rc == 2 and "stopped being numbers" in err.splitlines()[-1]
    saved = np.load(tmp_path / "sim.npy")
    assert saved.shape == (1, 2) and np.isfinite(saved).all()


def test_a_model_whose_activations_overflow_stops_with_a_sentence(tmp_path, tiny_gptlab_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=2, n_head=2, d_model=8))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.fill_(3e38)  # finite weights, infinite sums
    save_checkpoint(tmp_path / "hot", model, str(tiny_gptlab_dir / "tokenizer.json"))
    lm = load_model(str(tmp_path / "hot"))
    with pytest.raises(LabError, match=r"hidden states stopped being numbers .* by layer-step 2") as e:
        run_consensus(lm, ["ROMEO: but soft"], ConsensusConfig(iterations=3, engine="block"))
    assert "What was computed before is kept" in str(e.value)
    events = consensus_stream(lm, ["ROMEO: but soft"], ConsensusConfig(iterations=3, engine="block"))
    result = next(events).result
    with pytest.raises(LabError):
        for _ in events:
            pass
    assert result.columns_done == 2 and np.isfinite(result.trimmed().metric).all()
    assert result.steps_done.tolist() == [1]


def test_simulation_memory_counts_its_working_tensors():
    cfg = SimulationConfig(tokens=64, dim=64, batch=8, steps=2, memory_budget=100_000)
    with pytest.raises(LabError, match="memory budget"):
        simulation_stream(cfg)


# -- recordings grow as the run reaches them --------------------------------------------------------------

def test_a_long_run_starts_without_its_recordings_and_a_stopped_one_holds_only_what_it_reached(gpt2):
    """A million iterations recorded at every layer-step would be 2 x 4M columns x 5 statistics
    (160 MB of NaN) before the first step; they grow as the run goes instead."""
    cfg = ConsensusConfig(iterations=10**6)
    events = consensus_stream(gpt2, ["hi there", "and another prompt"], cfg)
    started = next(events)
    P = len(started.result.steps)
    assert P == 10**6 * gpt2.stack.n_layer + 1
    assert started.result.metric.shape[1] < 10_000  # nothing the size of the run yet
    assert isinstance(next(events), Progress)
    events.close()
    result = started.result
    p = result.columns_done
    assert 0 < p <= result.metric.shape[1] < P
    cut = result.trimmed()
    assert cut.metric.shape == (2, p) and len(cut.steps) == p and np.isfinite(cut.metric[:, :p]).any()


@pytest.mark.parametrize("matrix", [False, True])
def test_grown_recordings_equal_whole_ones(gpt2, monkeypatch, matrix):
    """Recordings grown from 3 columns (many doublings) hold exactly what recordings allocated
    whole hold, and a complete run ends with all P columns."""
    import core.consensus.results as results

    prompts = ["hi there", "and another, longer prompt"]
    cfg = ConsensusConfig(iterations=7, matrix=matrix)
    sim_cfg = SimulationConfig(steps=50, matrix=matrix)
    whole, sim_whole = run_consensus(gpt2, prompts, cfg), run_simulation(sim_cfg)
    monkeypatch.setattr(results, "FIRST_COLUMNS", 3)
    grown, sim_grown = run_consensus(gpt2, prompts, cfg), run_simulation(sim_cfg)
    assert whole.metric.shape == (2, len(whole.steps)) and sim_whole.metric.shape[1] == 51
    for a, b in ((grown, whole), (sim_grown, sim_whole)):
        assert a.metric.shape == b.metric.shape
        for name in results.STAT_NAMES:
            np.testing.assert_array_equal(a.series(name), b.series(name))
        if matrix:
            assert a.matrix.shape == b.matrix.shape
            np.testing.assert_array_equal(a.matrix, b.matrix)


def test_a_simulation_of_ten_million_steps_starts_at_once_and_stops_small():
    events = simulation_stream(SimulationConfig(steps=10**7))
    started = next(events)
    assert started.result.metric.shape[1] < 10_000
    assert isinstance(next(events), Progress)
    events.close()
    assert started.result.columns_done <= started.result.metric.shape[1] < 10**7
