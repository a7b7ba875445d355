"""The continuous-time attention simulator: invariants, a closed-form check, layer-derived Q/K/V,
events, errors and the ``--simulate`` command line."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from core.consensus.engine import ConsensusResult, Finished, Progress, Started
from core.consensus.metrics import STAT_NAMES, token_stats
from core.errors import LabError
from core.models.loading import load_model
from core.commands.consensus import add_simulation_arguments, run_simulation_command
from core.consensus.simulation import (SimulationConfig, SimulationResult, initial_points, layer_projections, make_qkv,
                                       run_simulation, simulation_stream)


def sim(**kw) -> SimulationResult:
    return run_simulation(SimulationConfig(**kw))


# -- invariants --------------------------------------------------------------------------------

@pytest.mark.parametrize("integrator", ["euler", "rk4"])
@pytest.mark.parametrize("qkv", ["identity", "random"])
def test_tokens_stay_on_the_sphere(integrator, qkv):
    r = sim(tokens=12, dim=5, qkv=qkv, dt=0.3, beta=2.0, steps=150, batch=2, integrator=integrator, seed=3)
    norms = np.linalg.norm(r.hidden.astype(np.float64), axis=-1)  # (B, n)
    assert r.hidden.shape == (2, 12, 5)
    assert np.abs(norms - 1).max() < 1e-5
    # mean dot equals mean cosine when every token has norm 1
    np.testing.assert_allclose(r.mean_dot, r.mean_cosine, atol=1e-5)


def test_identity_qkv_converges_to_consensus():
    r = sim(tokens=10, dim=3, qkv="identity", dt=0.2, beta=1.0, steps=120, batch=3, seed=0)
    assert (r.metric[:, 0] > 0.1).all() and (r.mean_cosine[:, 0] < 0.5).all()  # spread out at t = 0
    assert np.abs(r.metric[:, -1]).max() < 1e-5
    assert np.abs(r.mean_cosine[:, -1] - 1).max() < 1e-5
    assert np.abs(r.centroid_distance[:, -1]).max() < 1e-3
    # the cosines only grow along the way (with V = I the dynamics are a gradient flow)
    assert (np.diff(r.mean_cosine.astype(np.float64), axis=1) > -1e-6).all()


def test_two_tokens_follow_the_closed_form():
    """For n = 2 and Q = K = V = I the angle obeys c' = 2 (1 - c^2) e^{beta c} / (e^beta + e^{beta c})
    with c = cos(x_1, x_2): integrate that scalar ODE finely in float64 and compare."""
    beta, dt, steps = 1.5, 0.05, 60
    r = sim(tokens=2, dim=4, qkv="identity", dt=dt, beta=beta, steps=steps, seed=7)
    c = float(r.mean_cosine[0, 0])

    def f(c):
        return 2 * (1 - c * c) * math.exp(beta * c) / (math.exp(beta) + math.exp(beta * c))

    h, out = dt / 50, [c]
    for _ in range(steps):
        for _ in range(50):
            k1 = f(c); k2 = f(c + h / 2 * k1); k3 = f(c + h / 2 * k2); k4 = f(c + h * k3)
            c += h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(c)
    np.testing.assert_allclose(r.mean_cosine[0], np.array(out), atol=2e-6)
    assert out[-1] - out[0] > 0.3  # the check covers real motion, not a resting pair
    np.testing.assert_allclose(r.times, np.arange(steps + 1) * dt)


def test_rk4_is_more_accurate_than_euler():
    ref = sim(tokens=6, dim=3, qkv="random", dt=0.01, steps=200, seed=5).hidden
    err = {}
    for method in ("euler", "rk4"):
        err[method] = np.abs(sim(tokens=6, dim=3, qkv="random", dt=0.1, steps=20, seed=5,
                                 integrator=method).hidden - ref).max()
    assert err["rk4"] < 1e-4 < err["euler"]


def test_causal_first_token_never_moves():
    """Masked attention: token 0 attends only to itself, and with V = I its update x_0 projects to 0."""
    r = sim(tokens=8, dim=4, qkv="identity", causal=True, steps=100, dt=0.2, batch=2, seed=1)
    x0 = initial_points(2, 8, 4, seed=1).numpy()
    np.testing.assert_allclose(r.hidden[:, 0], x0[:, 0], atol=1e-6)
    assert np.abs(r.metric[:, -1]).max() < 1e-4  # the others gather on it


def test_determinism_by_seed():
    a = sim(tokens=6, dim=4, qkv="random", steps=30, batch=2, seed=11, matrix=True)
    b = sim(tokens=6, dim=4, qkv="random", steps=30, batch=2, seed=11, matrix=True)
    c = sim(tokens=6, dim=4, qkv="random", steps=30, batch=2, seed=12, matrix=True)
    for name in (*STAT_NAMES, "hidden", "matrix"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.allclose(a.hidden, c.hidden)
    torch.testing.assert_close(make_qkv("random", 4, seed=11).q, make_qkv("random", 4, seed=11).q)


# -- the result and the events ------------------------------------------------------------------

def test_result_layout_matches_a_model_run():
    r = sim(tokens=5, dim=3, steps=10, batch=2, matrix=True)
    assert isinstance(r, ConsensusResult) and r.complete
    assert r.steps.tolist() == list(range(11)) and r.total_steps == 10 and r.n_layer == 1
    for name in STAT_NAMES:
        assert getattr(r, name).shape == (2, 11) and getattr(r, name).dtype == np.float32
    assert r.matrix.shape == (2, 5, 5, 11) and r.eplot.shape == (2, 10, 2)
    assert r.hidden.shape == (2, 5, 3) and r.lengths == [5, 5] and r.prompts == ["init 0", "init 1"]
    # the last column is token_stats of the final state, the engine's own statistics
    stats, cos = token_stats(torch.from_numpy(r.hidden), matrix=True)
    for k, name in enumerate(STAT_NAMES):
        np.testing.assert_allclose(getattr(r, name)[:, -1], stats[:, k].numpy(), atol=1e-6)
    np.testing.assert_allclose(r.matrix[..., -1], cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(r.eplot[:, :, 0], r.mean_cosine[:, 1:])
    assert r.series("metric") is r.metric


def test_record_every_keeps_the_same_points():
    full = sim(tokens=5, dim=3, steps=23, seed=2)
    sparse = sim(tokens=5, dim=3, steps=23, seed=2, record_every=5)
    assert sparse.steps.tolist() == [0, 5, 10, 15, 20, 23]
    np.testing.assert_array_equal(sparse.metric, full.metric[:, sparse.steps])
    np.testing.assert_array_equal(sparse.hidden, full.hidden)


def test_events_stream_and_stop_keeps_the_partial_result():
    cfg = SimulationConfig(tokens=5, dim=3, steps=100, batch=2, max_events=10)
    events = list(simulation_stream(cfg))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == list(range(10, 101, 10)) and all(p.total == 100 for p in progress)
    seen = np.concatenate([p.chunk.steps for p in progress])
    assert seen.tolist() == list(range(101))
    result = events[0].result
    assert events[-1].result is result
    np.testing.assert_array_equal(np.concatenate([p.chunk.metric for p in progress], axis=1), result.metric)

    gen = simulation_stream(cfg)
    live = next(gen).result
    for ev in gen:
        if isinstance(ev, Progress) and ev.step >= 30:
            break
    gen.close()
    assert live.steps_done.tolist() == [30, 30] and not live.complete
    assert np.isfinite(live.metric[:, :31]).all() and np.isnan(live.metric[:, 31:]).all()
    cut = live.trimmed()
    assert isinstance(cut, SimulationResult) and cut.metric.shape == (2, 31) and cut.simulation.tokens == 5
    np.testing.assert_array_equal(cut.metric, result.metric[:, :31])


# -- Q, K, V from a model layer -----------------------------------------------------------------

@pytest.fixture(params=["tiny_gpt2_dir", "tiny_neo_dir", "tiny_gptlab_dir"])
def tiny_model(request):
    return load_model(str(request.getfixturevalue(request.param)))


def _family_qkv(lm, layer: int, x: torch.Tensor):
    """The layer's own q, k, v projections of ``x`` (biases removed), and its output projection."""
    block = lm.stack.blocks[layer]
    d = lm.stack.d_model
    if lm.stack.family == "gpt_neo":
        a = block.attn.attention
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)  # GPT-Neo's q/k/v have no bias

        def out(y):
            return a.out_proj(y) - a.out_proj.bias
    else:
        qkv = block.attn.c_attn(x) - block.attn.c_attn.bias
        q, k, v = qkv.split(d, dim=-1)

        def out(y):
            return block.attn.c_proj(y) - block.attn.c_proj.bias
    return q, k, v, out


@torch.no_grad()
def test_layer_qkv_shapes_and_values(tiny_model):
    lm = tiny_model
    d, H, L = lm.stack.d_model, lm.stack.n_head, lm.stack.n_layer
    hs = d // H
    layer = L - 1
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(0))
    q, k, v, out = _family_qkv(lm, layer, x)
    wq, wk, wv, wo = layer_projections(lm, layer)
    assert all(w.shape == (d, d) and w.dtype == torch.float32 for w in (wq, wk, wv, wo))
    torch.testing.assert_close(x @ wq.t(), q, atol=1e-5, rtol=1e-5)

    full = make_qkv(f"layer:{layer}", 999, lm=lm)  # the model's width wins over the asked dim
    assert full.q.shape == full.k.shape == full.v.shape == (d, d) and full.dim == d
    per_head = torch.stack([q[:, h * hs:(h + 1) * hs] @ k[:, h * hs:(h + 1) * hs].t() for h in range(H)])
    torch.testing.assert_close((x @ full.q.t()) @ (x @ full.k.t()).t(), per_head.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x @ full.v.t(), out(v), atol=1e-5, rtol=1e-4)

    head = H - 1
    one = make_qkv(f"layer:{layer}:{head}", 16, lm=lm)
    cols = slice(head * hs, (head + 1) * hs)
    assert one.q.shape == one.k.shape == (hs, d) and one.v.shape == (d, d)
    torch.testing.assert_close(x @ one.q.t(), q[:, cols], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x @ one.k.t(), k[:, cols], atol=1e-5, rtol=1e-5)
    only = torch.zeros_like(v)
    only[:, cols] = v[:, cols]
    torch.testing.assert_close(x @ one.v.t(), out(only), atol=1e-5, rtol=1e-4)
    assert f"head {head}" in one.description and "block" in full.description


def test_layer_simulation_runs_in_the_model_width(tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    r = run_simulation(SimulationConfig(tokens=6, dim=3, qkv="layer:1:0", steps=5, beta=4.0), lm=lm)
    assert r.hidden.shape == (1, 6, lm.stack.d_model) and r.simulation.dim == lm.stack.d_model
    assert np.abs(np.linalg.norm(r.hidden, axis=-1) - 1).max() < 1e-5
    assert "head 0" in r.qkv_description


# -- bad inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    (dict(tokens=1), "at least 2 tokens"), (dict(dim=1), "dimension d"), (dict(dt=0), "step size dt"),
    (dict(dt=-0.1), "step size dt"), (dict(dt=float("nan")), "step size dt"), (dict(steps=0), "at least 1"),
    (dict(batch=0), "initial conditions"), (dict(integrator="leapfrog"), "integrator"),
    (dict(qkv="layer"), "Q/K/V source"), (dict(qkv="banana"), "Q/K/V source"),
    (dict(qkv="layer:0"), "load a model"), (dict(record_every=0), "record every"),
    (dict(beta=float("inf")), "beta"),
])
def test_bad_settings_raise_laberror(kw, words):
    with pytest.raises(LabError, match=words):
        simulation_stream(SimulationConfig(**kw))


def test_bad_layer_and_head_and_memory(tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    with pytest.raises(LabError, match="blocks 0..1"):
        make_qkv("layer:2", 4, lm=lm)
    with pytest.raises(LabError, match="heads 0..1"):
        make_qkv("layer:0:2", 4, lm=lm)
    offer = r"needs about 45.5 KB, over the 19.5 KB memory budget; record every 3 steps \(--record-every 3\)"
    with pytest.raises(LabError, match=offer):
        simulation_stream(SimulationConfig(tokens=10, dim=3, steps=100, matrix=True, memory_budget=20_000))
    # 4 bytes x (5 series + 10 x 10 cosines) per column, plus the final state and the working memory
    # (working_bytes): k = 3 gives 35 columns
    simulation_stream(SimulationConfig(tokens=10, dim=3, steps=100, matrix=True, memory_budget=20_000,
                                       record_every=3))


# -- the command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    """The consensus command's own flags plus the simulation's, as the wired command declares them."""
    from core.commands import consensus as command

    p = argparse.ArgumentParser()
    command.add_arguments(p)
    if not any("--simulate" in a.option_strings for a in p._actions):
        add_simulation_arguments(p)
    return p


def test_simulate_command_writes_the_model_run_layouts(tmp_path, capsys):
    args = _parser().parse_args(["--simulate", "--tokens", "6", "--dim", "3", "--size", "40", "--inits", "2",
                                 "--dt", "0.2", "--savefile", str(tmp_path / "run"), "--eplot",
                                 str(tmp_path / "e"), "--matrixerror", str(tmp_path / "m.npy"), "--device", "cpu"])
    assert run_simulation_command(args) == 0
    metric = np.load(tmp_path / "run.npy", allow_pickle=False)
    hidden = np.load(tmp_path / "run_hidden.npy", allow_pickle=False)
    eplot = np.load(tmp_path / "e.npy", allow_pickle=False)
    matrix = np.load(tmp_path / "m.npy", allow_pickle=False)
    assert metric.shape == (2, 41) and metric.dtype == np.float32
    assert hidden.shape == (2, 6, 3) and eplot.shape == (2, 40, 2) and matrix.shape == (2, 6, 6, 40)
    expected = run_simulation(SimulationConfig(tokens=6, dim=3, steps=40, batch=2, dt=0.2, matrix=True))
    np.testing.assert_array_equal(metric, expected.metric)
    np.testing.assert_array_equal(matrix, expected.matrix[..., 1:])  # after each step, as after each block
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("init 0: metric") and "t = 8" in out[0]


def test_simulate_command_refuses_model_run_flags():
    for flags, name in [(["--noff"], "--noff"), (["--prompt", "hi"], "--prompt"), (["--randominit"], "--randominit"),
                        (["--use-model", "3"], "--use-model"), (["--decode", "0"], "--decode")]:
        args = _parser().parse_args(["--simulate", "--size", "3", *flags])
        with pytest.raises(LabError, match=name):
            run_simulation_command(args)


def test_simulate_through_the_cli_when_wired(tmp_path, capsys):
    from core.commands.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if not any("--simulate" in a.option_strings for a in sub.choices["consensus"]._actions):
        pytest.skip("`python -m core consensus --simulate` is not wired into core/commands/consensus.py yet")
    code = main(["consensus", "--simulate", "--tokens", "4", "--dim", "3", "--size", "5", "--device", "cpu",
                 "--savefile", str(tmp_path / "s")])
    assert code == 0 and np.load(tmp_path / "s.npy").shape == (1, 6)
    assert main(["consensus", "--simulate", "--tokens", "1", "--size", "5"]) == 2
    assert "--tokens must be between 2 and" in capsys.readouterr().err  # refused while parsing
