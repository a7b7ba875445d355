"""Generate page, streaming: the completion drawn live, at the pace of the engine.

Why redraws are timed, not per token: each call into Streamlit builds a message, sends it to the
browser and makes the browser lay the page out again; on a small model that costs more than a
token, so redrawing per token made the page 5-20x slower than `python -m core generate` on the same
model. The live text is redrawn at most every :data:`REDRAW_S` seconds, and once more the moment the
last token is in (before the full result, whose token view takes longer to build); a run's record
is refreshed just before each redraw, so Stop, which Streamlit delivers at the page's next call
into it, still keeps every token produced until then.

Compare mode decodes both settings in one batched walk (:mod:`core.generation.batched`) when
neither uses beam search, so two settings take about the time of one.
"""
from __future__ import annotations

import time
from dataclasses import replace

import streamlit as st

from core.errors import LabError, failure
from core.generation.autoregressive import Finished, GenerationResult, TokenEvent, partial_result
from core.generation.batched import batchable, stream_many
from core.generation.config import SamplingConfig, draw_seed
from core.generation.sampler import AUTOREGRESSIVE
from core.models.loading import LoadedModel
from pages.parts.common import stream_run

REDRAW_S = 0.08  # the live view is redrawn at most this often (seconds); the tests set 0 to see every token
OUT_OF_MEMORY = "the device ran out of memory; use fewer new tokens, beams, or a smaller model."


class Pace:
    """Says when the live view is due for a redraw: at most once every :data:`REDRAW_S` seconds."""

    def __init__(self) -> None:
        self.last = float("-inf")

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last < REDRAW_S:
            return False
        self.last = now
        return True


def draw_live(live, prompt: str, completion: str, done: int, total: int) -> None:
    with live.container():
        st.code(prompt + completion, language=None, wrap_lines=True)
        st.caption(f"{done} / {total} tokens…")


def seeded(cfg: SamplingConfig) -> SamplingConfig:
    """``cfg`` with its seed drawn now when sampling names none, so a stopped run still reports it."""
    if cfg.seed is None and not (cfg.greedy or cfg.num_beams > 1):
        return replace(cfg, seed=draw_seed())
    return cfg


def new_record(lm: LoadedModel, prompt: str, cfg: SamplingConfig, run: int) -> dict:
    return {"status": "running", "result": partial_result(lm, prompt, cfg, [], "", 0.0), "error": None, "run": run}


def run_one(lm: LoadedModel, prompt: str, cfg: SamplingConfig, record: dict) -> None:
    """Stream one generation into a live view below the caller's position, into ``record``."""
    live = st.empty()
    run = AUTOREGRESSIVE.start(lm, prompt, cfg)
    pace, count, drawn, completion = Pace(), 0, -1, ""

    def show(event) -> None:
        nonlocal count, drawn, completion
        if isinstance(event, TokenEvent):
            count, completion = count + 1, event.completion
        # the whole text is drawn the moment it is complete: the result view below takes a while longer
        if (isinstance(event, TokenEvent) and pace.due()) or (isinstance(event, Finished) and drawn != count):
            record["result"] = run.result
            draw_live(live, prompt, completion, count, cfg.max_new_tokens)
            drawn = count

    stream_run(record, run, live, OUT_OF_MEMORY, show)


def run_together(lm: LoadedModel, prompt: str, cfgs: dict[str, SamplingConfig], records: dict[str, dict],
                 columns: dict) -> None:
    """Decode every slot's settings in one batched walk, each drawn live in its own column."""
    slots = list(cfgs)
    lives = {}
    for slot in slots:
        with columns[slot]:
            lives[slot] = st.empty()
    tokens: dict[str, list] = {s: [] for s in slots}
    texts = {s: "" for s in slots}
    finished: dict[str, GenerationResult] = {}
    t0 = time.perf_counter()

    def refresh() -> None:
        for s in slots:
            records[s]["result"] = finished.get(s) or partial_result(lm, prompt, cfgs[s], tokens[s], texts[s],
                                                                     time.perf_counter() - t0)

    events = stream_many(lm, prompt, [cfgs[s] for s in slots])
    pace = Pace()
    try:
        for row, event in events:
            slot = slots[row]
            if isinstance(event, TokenEvent):
                tokens[slot].append(event.token)
                texts[slot] = event.completion
            elif isinstance(event, Finished):
                finished[slot] = event.result
            if pace.due():
                refresh()
                for s in slots:
                    draw_live(lives[s], prompt, texts[s], len(tokens[s]), cfgs[s].max_new_tokens)
        for s in slots:
            records[s]["result"], records[s]["status"] = finished[s], "done"
    except LabError as e:
        for s in slots:
            records[s]["status"], records[s]["error"] = "failed", str(e)
    except Exception as e:  # a bug or the device failing: one line for the user, no traceback
        for s in slots:
            records[s]["status"], records[s]["error"] = "failed", f"Generation failed: {failure(e, OUT_OF_MEMORY)}"
    finally:
        events.close()
    for live in lives.values():
        live.empty()


def run_all(lm: LoadedModel, prompt: str, cfgs: dict[str, SamplingConfig], records: dict[str, dict],
            columns: dict) -> None:
    """Run every slot: together in one walk where the settings allow (no beam search), else one
    after the other, each in its column."""
    if len(cfgs) > 1 and batchable(list(cfgs.values())):
        run_together(lm, prompt, cfgs, records, columns)
        return
    for slot, cfg in cfgs.items():
        with columns[slot]:
            run_one(lm, prompt, cfg, records[slot])
