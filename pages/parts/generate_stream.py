"""Generate page, streaming: the completion drawn live, at the pace of the engine.

Why the engine runs on a thread of its own: the page's time from the click on Generate to the last
token is what a user waits for. Run in the script, the engine would start only after the script
has drawn everything above the output (the sidebar, every control), and every redraw of the live
text would stop it while Streamlit builds and sends a message. The Generate button's callback
(:func:`start`) starts a :class:`Generation` on its own thread before the script draws anything;
the engine's loop there is the command line's, with nothing added per token but storing the latest
text. The script draws the page meanwhile and then follows the run (:func:`follow`), redrawing the
live text at most every :data:`REDRAW_S` seconds (never the token view or figures: those are drawn
once, from the result). Stop, or any other rerun, reaches the script at its next call into
Streamlit; :func:`follow` then stops the thread and waits for it, and the thread leaves every token
produced until then in the run's record.

Compare mode decodes both settings in one batched walk (:mod:`core.generation.batched`) when
neither uses beam search, so two settings take about the time of one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import streamlit as st

from core.errors import LabError, failure
from core.generation.autoregressive import Finished, GenerationResult, TokenEvent, partial_result
from core.generation.batched import batchable, stream_many
from core.generation.config import SamplingConfig, draw_seed
from core.generation.sampler import AUTOREGRESSIVE
from core.models.loading import LoadedModel

REDRAW_S = 0.08  # the live view is redrawn at most this often (seconds)
STOP_WAIT_S = 30.0  # the longest a stop waits for the thread's current token (a huge model on a CPU)
OUT_OF_MEMORY = "the device ran out of memory; use fewer new tokens, beams, or a smaller model."


def draw_live(live, prompt: str, completion: str, done: int, total: int) -> None:
    """Redraw the live text and its count. ``live`` is a pair of placeholders (text, count): each
    redraw updates the two elements in place, where a container redrawn whole made the browser build
    its elements anew every time (CPU a 2-core machine takes from the engine)."""
    text, count = live
    text.code(prompt + completion, language=None, wrap_lines=True)
    count.caption(f"{done} / {total} tokens…")


def seeded(cfg: SamplingConfig) -> SamplingConfig:
    """``cfg`` with its seed drawn now when sampling names none, so a stopped run still reports it."""
    if cfg.seed is None and not (cfg.greedy or cfg.num_beams > 1):
        return replace(cfg, seed=draw_seed())
    return cfg


def new_record(lm: LoadedModel, prompt: str, cfg: SamplingConfig, run: int) -> dict:
    return {"status": "running", "result": partial_result(lm, prompt, cfg, [], "", 0.0), "error": None, "run": run}


class Generation:
    """One click's generation (one settings column, or both decoded together), run on a thread of
    its own. ``records`` are the page's result records, one per slot: the thread writes each one's
    result and status when its run ends ("done", "failed"), or the partial result when stopped
    (status left "running" for the page to settle). ``live[slot]`` is ``(completion so far, tokens
    so far)``, replaced whole at each token, so the script reads it without a lock."""

    def __init__(self, lm: LoadedModel, prompt: str, cfgs: dict[str, SamplingConfig], records: dict[str, dict]):
        self.lm, self.prompt, self.cfgs, self.records = lm, prompt, cfgs, records
        self.live: dict[str, tuple[str, int]] = {slot: ("", 0) for slot in cfgs}
        self.first_token = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gptlab-generate", daemon=True)

    @property
    def slots(self) -> list[str]:
        return list(self.cfgs)

    def start(self) -> "Generation":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the run to end; True when it has."""
        self._thread.join(seconds)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop at the next token and wait for the thread to leave its records (at most STOP_WAIT_S)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)

    def _saw(self, slot: str, event: TokenEvent) -> None:
        self.live[slot] = (event.completion, event.token.index + 1)
        self.first_token.set()

    def _work(self) -> None:
        try:
            if len(self.cfgs) > 1 and batchable(list(self.cfgs.values())):
                self._together()
            else:
                for slot in self.slots:
                    if not self._stop.is_set():
                        self._one(slot)
        except LabError as e:
            self._fail(str(e))
        except Exception as e:  # a bug or the device failing: one line for the user, no traceback
            self._fail(f"Generation failed: {failure(e, OUT_OF_MEMORY)}")
        finally:
            self.first_token.set()

    def _fail(self, message: str) -> None:
        for record in self.records.values():
            if record["status"] == "running":
                record["status"], record["error"] = "failed", message

    def _one(self, slot: str) -> None:
        record = self.records[slot]
        run = AUTOREGRESSIVE.start(self.lm, self.prompt, self.cfgs[slot])
        try:
            for event in run:
                if isinstance(event, TokenEvent):
                    self._saw(slot, event)
                if self._stop.is_set():
                    record["result"] = run.result
                    return
            record["result"], record["status"] = run.result, "done"
        except BaseException:
            record["result"] = run.result  # what was produced before the failure
            raise
        finally:
            run.close()

    def _together(self) -> None:
        """Every slot's settings in one batched walk."""
        slots = self.slots
        tokens: dict[str, list] = {s: [] for s in slots}
        finished: dict[str, GenerationResult] = {}
        t0 = time.perf_counter()
        events = stream_many(self.lm, self.prompt, [self.cfgs[s] for s in slots])
        try:
            for row, event in events:
                slot = slots[row]
                if isinstance(event, TokenEvent):
                    tokens[slot].append(event.token)
                    self._saw(slot, event)
                elif isinstance(event, Finished):
                    finished[slot] = event.result
                if self._stop.is_set():
                    break
        finally:
            events.close()
            for s in slots:
                self.records[s]["result"] = finished.get(s) or partial_result(
                    self.lm, self.prompt, self.cfgs[s], tokens[s], self.live[s][0], time.perf_counter() - t0)
        if not self._stop.is_set():
            for s in slots:
                self.records[s]["status"] = "done"


def start(lm: LoadedModel, prompt: str, cfgs: dict[str, SamplingConfig], records: dict[str, dict]) -> Generation:
    """Start generating every slot's settings on a thread (called from the Generate button's
    callback, before the script draws anything); :func:`follow` shows it."""
    return Generation(lm, prompt, cfgs, records).start()


def follow(gen: Generation, columns: dict) -> None:
    """Show ``gen`` live, each slot in its column, until it ends: the first token as soon as it
    comes, then at most one redraw every :data:`REDRAW_S` seconds. However this ends (Stop and
    every other rerun interrupt it at a redraw), the thread is stopped and has written its records."""
    lives = {}
    for slot in gen.slots:
        with columns[slot]:
            lives[slot] = (st.empty(), st.empty())
    drawn: dict[str, int] = {}

    def redraw() -> None:
        for slot, live in lives.items():
            text, count = gen.live[slot]
            if count and drawn.get(slot) != count:
                draw_live(live, gen.prompt, text, count, gen.cfgs[slot].max_new_tokens)
                drawn[slot] = count

    try:
        while not gen.first_token.wait(REDRAW_S):  # the prompt's pass; a call into Streamlit lets Stop in
            for _, count in lives.values():
                count.caption("starting…")
        if gen.running:
            redraw()
            while not gen.wait(REDRAW_S):
                redraw()
    finally:
        gen.stop()
    for text, count in lives.values():
        text.empty()
        count.empty()
