"""core.generation.batched: several settings on one prompt in one batched walk give each setting's
own single-run text, and end each row on its own terms."""
from __future__ import annotations

import pytest

from core.errors import LabError
from core.generation.autoregressive import Finished, SamplingConfig, Started, TokenEvent, generate
from core.generation.batched import batchable, stream_many
from core.models.loading import load_model

PROMPT = "ROMEO: But soft, what light"


@pytest.fixture(scope="module")
def lm():
    return load_model("default")


def test_rows_match_single_runs_and_finish_on_their_own_terms(lm):
    cfgs = [SamplingConfig(greedy=True, max_new_tokens=12),
            SamplingConfig(max_new_tokens=30, seed=7, temperature=0.8, top_k=50, repetition_penalty=1.3),
            SamplingConfig(max_new_tokens=40, seed=3, stop=["\n"], n_alternatives=2)]
    events = list(stream_many(lm, PROMPT, cfgs))
    assert [row for row, ev in events if isinstance(ev, Started)] == [0, 1, 2]
    finished = {row: ev.result for row, ev in events if isinstance(ev, Finished)}
    for i, cfg in enumerate(cfgs):
        want = generate(lm, PROMPT, cfg)
        got = finished[i]
        assert got.completion == want.completion and got.stop_reason == want.stop_reason
        assert [t.token_id for t in got.tokens] == [t.token_id for t in want.tokens]
        assert [t.logprob for t in got.tokens] == pytest.approx([t.logprob for t in want.tokens], abs=1e-4)
        assert [len(t.alternatives) for t in got.tokens] == [cfg.n_alternatives] * len(got.tokens)
        assert got.prompt_perplexity == pytest.approx(want.prompt_perplexity, rel=1e-5)
        if cfg.seed is not None:
            assert got.settings["seed"] == cfg.seed
        streamed = [ev for row, ev in events if row == i and isinstance(ev, TokenEvent)]
        assert len(streamed) == len(got.tokens) and streamed[-1].completion == got.completion
    # a row that ends early leaves the batch: the others go on, and nothing follows its Finished
    last_event = {row: n for n, (row, ev) in enumerate(events)}
    assert all(isinstance(events[last_event[i]][1], Finished) for i in range(3))
    assert finished[2].stop_reason == "stop_string"


def test_beam_search_and_bad_settings_are_refused(lm):
    assert batchable([SamplingConfig(), SamplingConfig(greedy=True)])
    assert not batchable([SamplingConfig(), SamplingConfig(num_beams=2)])
    with pytest.raises(LabError, match="beam search"):
        list(stream_many(lm, PROMPT, [SamplingConfig(), SamplingConfig(num_beams=2)]))
    with pytest.raises(LabError, match="temperature must be above 0"):
        list(stream_many(lm, PROMPT, [SamplingConfig(temperature=0.0)]))
    with pytest.raises(LabError, match="prompt is empty"):
        list(stream_many(lm, "", [SamplingConfig()]))
