"""Several users at once: the app's model is one object per process, shared by every browser
session (pages/parts/common.py's st.cache_resource loader), so nothing a session does may write it, each
session's results must stay its own, and repeating the main actions must not grow memory.

The two-sessions-at-the-same-time check in a real browser is in test_browser.py.
"""
from __future__ import annotations

import ctypes
import gc
import os
import weakref

import numpy as np
import pytest
import torch
from app_harness import open_app, set_widgets, texts

from core.consensus.engine import (ConsensusConfig, DecodeConfig, Finished, Progress, consensus_decode_stream,
                            consensus_stream, run_consensus)
from core.errors import LabError
from core.generation.autoregressive import SamplingConfig, generate
from core.models.loading import load_model

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "ROMEO: But soft!"]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


# -- re-initialisation never writes the model it is given --------------------------------------------

@pytest.mark.parametrize("mode", ["once", "iteration", "block"])
def test_reinit_run_leaves_the_shared_model_untouched_before_during_and_after(tiny_gpt2_dir, mode):
    shared = load_model(str(tiny_gpt2_dir))
    saved = snapshot(shared.model)
    ids = torch.tensor([shared.tokenizer.encode(PROMPTS[1])])
    logits_before = shared.stack.logits(ids)
    text_before = generate(shared, PROMPTS[1], SamplingConfig(seed=3, max_new_tokens=6)).text

    gen = consensus_stream(shared, PROMPTS, ConsensusConfig(iterations=6, reinit=mode, seed=5, max_events=12))
    result = next(gen).result
    seen = 0
    for ev in gen:
        seen += isinstance(ev, Progress)
        if seen == 3:
            break
    assert 0 < result.steps_done.max() < result.total_steps  # really part way
    # mid-run: the weights, and what another session generating now would get, are the loaded ones
    assert same_weights(shared.model, saved)
    assert torch.equal(shared.stack.logits(ids), logits_before)
    assert generate(shared, PROMPTS[1], SamplingConfig(seed=3, max_new_tokens=6)).text == text_before
    rest = list(gen)
    assert isinstance(rest[-1], Finished) and rest[-1].result.complete
    assert same_weights(shared.model, saved)

    # the same numbers as re-initialising a model in place, the CLI's way (restore_weights=False)
    own = load_model(str(tiny_gpt2_dir))
    in_place = run_consensus(own, PROMPTS, ConsensusConfig(iterations=6, reinit=mode, seed=5, restore_weights=False))
    for name in ("metric", "mean_cosine", "mean_dot", "effective_rank", "centroid_distance", "hidden"):
        np.testing.assert_array_equal(getattr(rest[-1].result, name), getattr(in_place, name), err_msg=name)
    assert not same_weights(own.model, saved)  # the CLI path does write its own model


def test_consensus_decoding_with_reinit_leaves_the_shared_model_untouched(tiny_neo_dir):
    shared = load_model(str(tiny_neo_dir))
    saved = snapshot(shared.model)
    cfg = ConsensusConfig(iterations=3, reinit="iteration", seed=2, max_events=20)
    gen = consensus_decode_stream(shared, PROMPTS[1:], cfg, DecodeConfig(new_tokens=3, seed=4))
    next(gen), next(gen), next(gen)
    assert same_weights(shared.model, saved)
    result = next(ev for ev in gen if isinstance(ev, Finished)).result
    assert result.complete and same_weights(shared.model, saved)
    own = load_model(str(tiny_neo_dir))
    in_place = ConsensusConfig(iterations=3, reinit="iteration", seed=2, restore_weights=False)
    want = next(ev for ev in consensus_decode_stream(own, PROMPTS[1:], in_place, DecodeConfig(new_tokens=3, seed=4))
                if isinstance(ev, Finished)).result
    assert result.new_ids == want.new_ids
    np.testing.assert_array_equal(result.traces, want.traces)


def test_private_copy_keeps_tied_weights_tied_and_the_decode_layout(tiny_gptlab_dir):
    from core.consensus.engine import _private_copy

    shared = load_model(str(tiny_gptlab_dir))
    mine = _private_copy(shared)
    params = dict(shared.model.named_parameters())
    for name, p in mine.model.named_parameters():
        assert p.data_ptr() != params[name].data_ptr()  # own storage
        assert p.shape == params[name].shape and p.stride() == params[name].stride()
    assert mine.model.lm_head.weight is mine.model.transformer.wte.weight  # still tied, as in the original
    assert mine.stack.model is mine.model and mine.stack is not shared.stack


def test_a_private_copy_that_does_not_fit_is_one_line_saying_what_to_change(tiny_gpt2_dir, monkeypatch):
    shared = load_model(str(tiny_gpt2_dir))

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch, "empty_like", no_room)
    with pytest.raises(LabError, match="needs a second copy of the model on cpu.*16-bit dtype"):
        run_consensus(shared, PROMPTS, ConsensusConfig(iterations=2, reinit="once"))
    assert run_consensus(shared, PROMPTS, ConsensusConfig(iterations=2)).complete  # no copy without re-init


# -- two app sessions, one model ---------------------------------------------------------------------

@pytest.fixture
def counted_loads(monkeypatch) -> list[tuple]:
    """Every core.models.loading.load_model call the app's cached loader makes, from an empty cache."""
    import pages.parts.common as common

    calls: list[tuple] = []
    real = common.load_model

    def counting(spec, *args, **kwargs):
        calls.append((spec, args, tuple(sorted(kwargs.items()))))
        return real(spec, *args, **kwargs)

    common._load_cached.clear()
    monkeypatch.setattr(common, "load_model", counting)
    yield calls
    common._load_cached.clear()  # nothing built with the counter outlives the test


def loaded(at):
    """The model this session's last run used (the sidebar's load outcome holds a weak reference)."""
    return at.session_state["_model_outcome"][1]()


def generate_in(at, prompt: str, seed: int, n: int = 6):
    at.text_area(key="gen_prompt").input(prompt)
    set_widgets(at, "gen_A_", seed=seed, max_new_tokens=n)
    at.button(key="gen_go").click().run()
    assert not at.exception and not at.error
    return at


def test_two_sessions_share_one_model_load_and_keep_their_own_results(counted_loads):
    a = open_app("pages/generate.py")
    b = open_app("pages/generate.py")
    assert len(counted_loads) == 1 and counted_loads[0][0] == "default"
    model_a, model_b = loaded(a), loaded(b)
    assert model_a is model_b  # the same object, not an equal copy

    generate_in(a, "ROMEO:", seed=1)
    generate_in(b, "JULIET:", seed=2)
    want_a = generate(model_a, "ROMEO:", SamplingConfig(seed=1, max_new_tokens=6)).text
    want_b = generate(model_a, "JULIET:", SamplingConfig(seed=2, max_new_tokens=6)).text
    assert want_a != want_b
    assert texts(b.code) == [want_b]
    a.run()  # A's next rerun still shows A's result, not the one B produced since
    assert texts(a.code) == [want_a]
    assert a.session_state["gen_prompt"] == "ROMEO:" and b.session_state["gen_prompt"] == "JULIET:"
    assert a.session_state["gen_results"]["A"]["result"].text == want_a
    assert b.session_state["gen_results"]["A"]["result"].text == want_b

    # B re-initialises weights in a consensus run; A's generation with the same seed is unchanged
    b.switch_page("pages/consensus.py").run()
    set_widgets(b, "cons_", iterations=2, reinit="once")
    b.button(key="cons_run").click().run()
    assert not b.exception and [r["status"] for r in b.session_state["cons_runs"]] == ["finished"]
    assert "cons_runs" not in a.session_state
    generate_in(a, "ROMEO:", seed=1)
    assert texts(a.code) == [want_a]
    assert len(counted_loads) == 1  # still the one load, across pages and sessions


def test_an_idle_session_does_not_keep_a_model_the_cache_dropped(counted_loads):
    import pages.parts.common as common

    a = open_app()
    ref = weakref.ref(loaded(a))
    common._load_cached.clear()  # as when other sessions' models push it out of the cache
    gc.collect()
    assert ref() is None  # a's session state did not keep it alive
    a.run()
    assert not a.exception and not a.error and loaded(a) is not None and len(counted_loads) == 2


# -- memory over repeated runs -------------------------------------------------------------------------

def rss_mb() -> float:
    """Resident memory after a collection, with freed heap handed back to the OS where glibc can
    (otherwise the allocator's free lists make RSS swing by tens of MB between identical runs)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can reach: exact where RSS is noisy (allocator free
    lists, the chart renderer's own heap), so a KV cache or model copy kept per run shows up."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":  # type(): no __class__ hooks
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # an object whose storage cannot be read holds no tensor of ours
            continue
    return sum(storages.values())


RUNS, WARM, TOLERANCE_MB = 20, 5, 30.0
RENDERER_WARMUP = 30  # the PNG renderer's V8 heap grows ~40 MB over its first ~25 charts, then stays


def warm_up_chart_renderer() -> None:
    """The Consensus page renders its charts to PNG with vl_convert, whose embedded V8 heap grows to
    a plateau over its first couple of dozen renders whatever the app does (measured alone:
    213 -> 257 MB, flat from render 25 to 120). Reaching that plateau first keeps it out of the
    window below, which is there to catch the app's own growth."""
    import altair as alt
    import pandas as pd
    import vl_convert

    chart = alt.Chart(pd.DataFrame({"step": range(9), "value": np.linspace(0, 1, 9)})).mark_line().encode(
        x="step:Q", y="value:Q")
    for _ in range(RENDERER_WARMUP):
        vl_convert.vegalite_to_png(chart.to_json(), scale=2)


def test_memory_stays_flat_over_repeated_generations_and_consensus_runs():
    warm_up_chart_renderer()
    gen = open_app("pages/generate.py")
    gen.text_area(key="gen_prompt").input("ROMEO:")
    set_widgets(gen, "gen_A_", seed=1, max_new_tokens=8)
    cons = open_app("pages/consensus.py")
    set_widgets(cons, "cons_", iterations=2)
    rss, tensors = [], []
    for i in range(RUNS):
        gen.button(key="gen_go").click().run()
        set_widgets(cons, "cons_", reinit="once" if i % 2 else "none")  # every other run on a private copy
        cons.button(key="cons_run").click().run()
        assert not gen.exception and not gen.error and not cons.exception and not cons.error
        assert gen.session_state["gen_results"]["A"]["status"] == "done"
        rss.append(rss_mb())
        if i + 1 in (WARM, RUNS):
            tensors.append(live_tensor_bytes())
    runs = cons.session_state["cons_runs"]
    assert len(runs) == 12 and all(r["status"] == "finished" for r in runs)  # the page keeps the last 12
    # the floor of three runs: a leak raises it, while single samples of identical runs differ by up
    # to ~15 MB (allocator state after each script-run thread)
    floor_warm, floor_end = min(rss[WARM - 3:WARM]), min(rss[RUNS - 3:RUNS])
    growth = floor_end - floor_warm
    print(f"RSS runs {WARM - 2}-{WARM}: {floor_warm:.1f} MB, runs {RUNS - 2}-{RUNS}: {floor_end:.1f} MB "
          f"(growth {growth:+.1f} MB; run {WARM} -> run {RUNS}: {rss[WARM - 1]:.1f} -> {rss[-1]:.1f} MB; "
          f"all: {', '.join(f'{x:.0f}' for x in rss)}); "
          f"live tensors {tensors[0] / 2**20:.2f} MB -> {tensors[1] / 2**20:.2f} MB")
    assert growth < TOLERANCE_MB
    assert tensors[1] == tensors[0]  # no tensor (KV cache, private model copy, activations) outlives its run
