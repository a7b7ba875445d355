"""What a consensus run will cost, said up front (core.consensus.estimate): the memory and work in
the CLI's header and the page's caption (one function), and the time, measured once the run has
gone a couple of seconds, announced with how to stop it when the run is long."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from tests.conftest import CHECKOUT, wait_for

from core.commands.cli import build_parser, main
from core.consensus.config import LONG_RUN_S, ConsensusConfig
from core.consensus.estimate import estimate_run, fmt_duration, long_run_notice, time_left
from core.consensus.engine import memory_plan
from core.models.loading import load_model

PROMPT = "ROMEO: But soft, what light"


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59.4, "59 s"), (60, "1 min"), (3599, "59 min"),
                                           (3600, "1 h"), (3 * 3600 + 20 * 60, "3 h 20 min"), (86400, "1 d"),
                                           (2 * 86400 + 7 * 3600 + 59, "2 d 7 h"), (40 * 365 * 86400, "40 years")])
def test_durations_read_in_two_units_at_most(seconds, text):
    assert fmt_duration(seconds) == text


def test_the_time_left_is_the_pace_so_far_times_the_steps_left():
    assert time_left(100, 1_000, 2.0) == 18.0
    assert long_run_notice(100, 1_000, 2.0) is None  # 20 s in all
    assert long_run_notice(1, LONG_RUN_S, 1.0) is None  # exactly the threshold: not long
    assert long_run_notice(2_000, 4_000_000_000, 2.0) == (
        "This run takes about 46 d 7 h more at the pace of its first 2 s (2,000 of 4,000,000,000 layer-steps). "
        "Ctrl-C stops it and keeps what was computed (the run folder and the files asked for); a smaller --size or "
        "fewer prompts shorten it.")
    assert "(5 of 10,000 steps)" in long_run_notice(5, 10_000, 3.0, unit="steps")


def test_the_estimate_is_the_memory_plan_and_the_layer_steps(lm):
    ids = [lm.tokenizer.encode(PROMPT), lm.tokenizer.encode("fox"), lm.tokenizer.encode("the fox")]
    cfg = ConsensusConfig(iterations=7, record_every=3)
    est = estimate_run(lm, ids, cfg, texts=[PROMPT, "fox", "the fox"])
    plan = memory_plan(lm, ids, cfg, 0, [PROMPT, "fox", "the fox"])
    L = lm.stack.n_layer
    assert (est.layer_steps, est.memory, est.batch, est.budget) == (7 * L, plan.total, plan.batch, cfg.memory_budget)
    lengths = sorted(len(t) for t in ids)
    batches = f" in batches of {plan.batch}" if plan.batch < 3 else ""
    assert est.caption().startswith(f"3 prompts of {lengths[0]}–{lengths[-1]} tokens{batches} · {7 * L} layer-steps "
                                    f"per prompt · needs about ")
    assert est.caption().endswith(f"(budget 2.0 GB) · context {lm.stack.context_length}")
    decoding = estimate_run(lm, ids[:1], cfg, new_tokens=5)
    assert f"1 prompt of {len(ids[0])} + 5 new tokens · {7 * L} layer-steps per new token ({35 * L} per prompt)" \
        in decoding.caption()


def test_whole_numbers_take_exponents_so_the_scripts_sizes_read_as_typed():
    args = build_parser().parse_args(["consensus", "--size", "1e9", "--record-every", "2.5e3"])
    assert (args.size, args.record_every) == (10 ** 9, 2500)
    for bad in ("1.5", "1e-3", "1e99999"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["consensus", "--size", bad])


def test_the_header_says_the_work_and_memory_and_a_short_run_says_no_more(lm, tiny_gpt2_dir, capsys):
    assert main(["consensus", "--model", str(tiny_gpt2_dir), "--prompt", PROMPT, "--size", "3",
                 "--record-every", "2", "--no-run-folder"]) == 0
    err = capsys.readouterr().err.splitlines()
    est = estimate_run(lm, [lm.tokenizer.encode(PROMPT)], ConsensusConfig(iterations=3, record_every=2),
                       texts=[PROMPT])
    assert f"  {est.caption()}" in err
    assert not [line for line in err if "This run takes about" in line]


def test_a_run_of_days_says_so_in_seconds_and_ctrl_c_keeps_it(tiny_gpt2_dir, runs_dir):
    """The issue's command: a billion iterations, one column kept in a billion. It fits in memory,
    so it starts; a few seconds in, it says how long it will take and how to stop it; Ctrl-C stops
    it with the run folder kept."""
    log = runs_dir / "long-run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "core", "consensus", "--model", str(tiny_gpt2_dir), "--prompt",
                                 PROMPT, "--size", "1e9", "--record-every", "1e9", "--run-name", "days"],
                                cwd=CHECKOUT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(CHECKOUT), "OMP_NUM_THREADS": "1"})
    try:
        notice = wait_for(lambda: next((line for line in log.read_text().splitlines()
                                        if "This run takes about" in line), None))
        assert notice.startswith("This run takes about ") and " more at the pace of its first " in notice
        assert " of 3,000,000,000 layer-steps). Ctrl-C stops it and keeps what was computed" in notice
        text = log.read_text()
        assert "N = 1000000000 iterations x 3 blocks = 3000000000 layer-steps per prompt" in text
        assert "1 prompt of " in text and " · 3,000,000,000 layer-steps per prompt · needs about " in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert json.loads((runs_dir / "consensus" / "days" / "status.json").read_text())["state"] == "stopped"
