"""The CLI run in-process (core.commands.cli.main) on the tiny fixtures: command discovery, generate's
output and flag aliases, one-line errors with exit 2, bare state-dict loading, models, progress."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.commands.cli import build_parser, command_modules, latest_checkpoint, main, progress
from core.commands.generate import StreamPrinter, read_prompt, sampling_config
from core.errors import LabError
from core.generation.autoregressive import SamplingConfig, generate, perplexity
from core.models.loading import KNOWN_HUB_MODELS, load_model, offline_message

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The one error line at the end of stderr (transformers may draw a loading bar before it)."""
    assert err.endswith("\n") and "Traceback" not in err, err
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, err
    return lines[-1]


def flat(text: str) -> str:
    return " ".join(text.split())


# -- the framework --------------------------------------------------------------------------------

def test_help_lists_every_command_with_its_help_line(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    mods = command_modules()
    assert {"generate", "validate", "models"} <= {m.NAME for m in mods}
    for mod in mods:
        assert "\n" not in mod.HELP.strip()
        assert f"{mod.NAME} {flat(mod.HELP)}" in flat(out)


def test_every_command_has_help(capsys):
    for mod in command_modules():
        rc, out, _ = run_cli(capsys, mod.NAME, "--help")
        assert rc == 0 and f"python -m core {mod.NAME}" in out


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "core", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("generate", "validate", "models"):
        assert name in proc.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    rc, out, err = run_cli(capsys)
    assert rc == 2 and "generate" in err


def test_unknown_command_is_one_line(capsys):
    rc, out, err = run_cli(capsys, "frobnicate")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    import core.commands.models as models_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(models_cmd, "run", interrupted)
    rc, _, err = run_cli(capsys, "models")
    assert rc == 130 and "interrupted" in err


def test_lab_error_from_a_command_exits_2(capsys, monkeypatch):
    import core.commands.models as models_cmd

    def bad(args):
        raise LabError("Something is off; change it.")

    monkeypatch.setattr(models_cmd, "run", bad)
    rc, out, err = run_cli(capsys, "models")
    assert (rc, out, err) == (2, "", "error: Something is off; change it.\n")


# -- progress -------------------------------------------------------------------------------------

def _events(n: int, log: list):
    try:
        for i in range(n):
            yield {"step": i + 1}
    finally:
        log.append("closed")


@pytest.mark.parametrize("use_tqdm", [True, False])
def test_progress_passes_events_through_and_draws_on_stderr(capsys, monkeypatch, use_tqdm):
    if not use_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails -> plain bar
    log: list = []
    seen = list(progress(_events(4, log), 4, "steps", position=lambda e: e["step"],
                         status=lambda e: f"loss {e['step']}"))
    out, err = capsys.readouterr()
    assert seen == [{"step": i} for i in range(1, 5)]
    assert out == "" and "steps" in err and "4/4" in err
    assert log == ["closed"]


@pytest.mark.parametrize("use_tqdm", [True, False])
def test_progress_stopping_early_closes_the_job(capsys, monkeypatch, use_tqdm):
    if not use_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    log: list = []
    bar = progress(_events(100, log), 100, "job")
    got = [next(bar) for _ in range(3)]
    bar.close()
    assert got == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert log == ["closed"]
    assert "3/100" in capsys.readouterr().err


# -- generate -------------------------------------------------------------------------------------

def test_generate_greedy_prints_the_library_result(capsys, tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    expected = generate(lm, PROMPT, SamplingConfig(max_new_tokens=12, greedy=True))
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "--greedy",
                           "--max-new-tokens", 12, "--device", "cpu")
    assert rc == 0
    assert out == expected.text + "\n"
    assert f"{len(expected.tokens)} tokens" in err
    rc, streamed, _ = run_cli(capsys, "generate", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "--strategy",
                              "greedy", "--max_new_tokens", 12, "--stream", "--device", "cpu")
    assert rc == 0 and streamed == out


def test_generate_sampling_with_seed_matches_library(capsys, tiny_gptlab_dir):
    lm = load_model(str(tiny_gptlab_dir))
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    expected = generate(lm, "ROMEO: But", cfg)
    rc, out, _ = run_cli(capsys, "generate", "--model", tiny_gptlab_dir, "--prompt", "ROMEO: But",
                         "--max-new-tokens", 10, "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--seed", 7,
                         "--device", "cpu")
    assert rc == 0 and out == expected.text + "\n"


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    expected = generate(lm, PROMPT, SamplingConfig(max_new_tokens=5, greedy=True))
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    rc, out, _ = run_cli(capsys, "generate", "--model", tiny_gpt2_dir, "--greedy", "--max-new-tokens", 5,
                         "--device", "cpu")
    assert rc == 0 and out == expected.text + "\n"


def test_generate_json_logprobs_and_perplexity(capsys, tmp_path, tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    expected = generate(lm, PROMPT, SamplingConfig(max_new_tokens=6, greedy=True, n_alternatives=3))
    target = tmp_path / "out" / "result.json"
    rc, out, _ = run_cli(capsys, "generate", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "--greedy",
                         "--max-new-tokens", 6, "--alternatives", 3, "--logprobs", "--perplexity", "--json", target,
                         "--device", "cpu")
    assert rc == 0
    saved = json.loads(target.read_text())
    assert [t["token_id"] for t in saved["tokens"]] == [t.token_id for t in expected.tokens]
    assert saved["text"] == expected.text and len(saved["tokens"][0]["alternatives"]) == 3
    lines = out.splitlines()
    table = lines[lines.index("") + 1:]
    assert table[0].split()[:4] == ["#", "token", "logprob", "prob"]
    for row, tok in zip(table[1:7], expected.tokens):
        assert float(row.split()[2]) == pytest.approx(tok.logprob, abs=1e-4)
    ppl = float(lines[-1].removeprefix("prompt perplexity: "))
    assert ppl == pytest.approx(perplexity(lm, PROMPT), rel=1e-4)
    assert not list(tmp_path.glob("out/.*.tmp"))  # written atomically, no temp left behind


def test_generate_stop_string_cuts_the_completion(capsys, tiny_gpt2_dir):
    lm = load_model(str(tiny_gpt2_dir))
    full = generate(lm, PROMPT, SamplingConfig(max_new_tokens=12, greedy=True)).completion
    stop = full[3:5]
    assert stop
    for extra in ([], ["--stream"]):
        rc, out, err = run_cli(capsys, "generate", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "--greedy",
                               "--max-new-tokens", 12, "--stop", stop, "--device", "cpu", *extra)
        assert rc == 0
        assert out == PROMPT + full[:full.find(stop)] + "\n"
        assert "stop_string" in err


def test_ctrl_c_during_generation_keeps_what_was_made(capsys, monkeypatch, tmp_path, tiny_gpt2_dir):
    import core.generation.autoregressive as generation

    real_stream = generation.stream

    def interrupted_after_three(lm, prompt, cfg):
        for i, ev in enumerate(real_stream(lm, prompt, cfg)):
            yield ev
            if i == 3:  # Started + three tokens
                raise KeyboardInterrupt

    lm = load_model(str(tiny_gpt2_dir))
    expected = generate(lm, PROMPT, SamplingConfig(max_new_tokens=3, greedy=True))
    monkeypatch.setattr(generation, "stream", interrupted_after_three)
    target = tmp_path / "partial.json"
    rc, out, err = run_cli(capsys, "generate", "--model", tiny_gpt2_dir, "--prompt", PROMPT, "--greedy", "--stream",
                           "--max-new-tokens", 20, "--json", target, "--device", "cpu")
    assert rc == 130 and "interrupted" in err
    assert out == expected.text + "\n"
    saved = json.loads(target.read_text())
    assert saved["stop_reason"] == "stopped" and saved["completion"] == expected.completion
    assert [t["token_id"] for t in saved["tokens"]] == [t.token_id for t in expected.tokens]


def test_stream_printer_never_takes_text_back():
    out = io.StringIO()
    p = StreamPrinter(out, hold=2)            # longest stop string is 3 characters
    for partial in ["ab", "abc", "abcd\ufffd", "abcdé", "abcdéfg"]:
        p.update(partial)
        assert "abcdéfg".startswith(out.getvalue())
    assert "\ufffd" not in out.getvalue()
    p.finish("abcdéf")
    assert out.getvalue() == "abcdéf"


def _parse(*argv):
    return build_parser().parse_args(["generate", *map(str, argv)])


def test_reference_aliases_map_onto_the_sampling_config():
    args = _parse("--max_new_tokens", 7, "--top_k", 5, "--top_p", 0.8, "--min_p", 0.1, "--repetition_penalty", 1.3,
                  "--temperature", 0.7, "--seed", 3, "--num_beams", 1, "--stop", "a", "--stop", "\n\n")
    assert sampling_config(args) == SamplingConfig(max_new_tokens=7, top_k=5, top_p=0.8, min_p=0.1,
                                                   repetition_penalty=1.3, temperature=0.7, seed=3,
                                                   stop=["a", "\n\n"])
    assert sampling_config(_parse("--strategy", "greedy")).greedy is True
    topk = sampling_config(_parse("--strategy", "topk"))
    assert (topk.greedy, topk.top_k, topk.top_p) == (False, 50, 1.0)
    assert sampling_config(_parse("--strategy", "topk", "--top-k", 7)).top_k == 7
    topp = sampling_config(_parse("--strategy", "topp"))
    assert (topp.greedy, topp.top_k, topp.top_p) == (False, 0, 0.9)
    assert sampling_config(_parse("--strategy", "topp", "--top_p", 0.5)).top_p == 0.5
    assert sampling_config(_parse("--top-k", 0)).top_k == 0
    beams = sampling_config(_parse("--num-beams", 4, "--length-penalty", 0.5))
    assert (beams.num_beams, beams.length_penalty) == (4, 0.5)


def _every_parser(parser):
    """The parser and every sub(sub)command's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _every_parser(sub)


@pytest.mark.parametrize("text, value", [("-1e30", -1e30), ("-2.5e-6", -2.5e-6), ("-1_000", -1000.0),
                                         ("-.5", -0.5), ("-3", -3.0), ("-1E+2", -100.0)])
def test_negative_numbers_are_values_without_the_equals_form(text, value):
    parser = build_parser()
    assert parser.parse_args(["consensus", "--simulate", "--beta", text]).beta == value
    assert parser.parse_args(["generate", "--length-penalty", text]).length_penalty == value


def test_a_malformed_negative_value_is_named_as_the_flags_value(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["consensus", "--simulate", "--beta", "-1x"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --beta: invalid float value: '-1x'; pass a number")


def test_no_flag_looks_like_a_negative_number():
    """argparse takes "-1e30" for a value only while no option of that parser looks like a number."""
    from core.commands.cli import NEGATIVE_NUMBER

    parsers = list(_every_parser(build_parser()))
    assert len(parsers) > 10
    for parser in parsers:
        assert parser._negative_number_matcher is NEGATIVE_NUMBER
        assert not parser._has_negative_number_optionals, parser.prog


def test_reference_model_flag_spellings():
    a = _parse("--tokenizer-path", "tok.json", "--ckpt", "c.pt", "--model-version", "gpt3", "--source", "local")
    assert (a.tokenizer, a.checkpoint, a.model_version, a.source) == ("tok.json", "c.pt", "gpt3", "local")
    b = _parse("--checkpoint", "d", "--tokenizer", "t", "--weights", "auto")
    assert (b.checkpoint, b.tokenizer, b.weights, b.model, b.device, b.dtype) == ("d", "t", "auto", "default",
                                                                                  "auto", "float32")


def test_read_prompt():
    assert read_prompt(None, io.StringIO("line one\nline two\n")) == "line one\nline two"
    assert read_prompt("as given\n") == "as given\n"
    with pytest.raises(LabError, match="prompt is empty"):
        read_prompt(None, io.StringIO("\n"))


@pytest.mark.parametrize("argv, message", [
    (["--model", "./no/such/model"], "does not exist"),
    (["--prompt", ""], "prompt is empty"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--max-new-tokens", "-4"], "--max-new-tokens must be at least 1"),
    (["--device", "tpu"], "Unknown device 'tpu'"),
    (["--dtype", "float8"], "invalid choice"),
    (["--top-k", "many"], "invalid int value"),
    (["--greedy", "--strategy", "topp"], "contradicts"),
    (["--temperature", "0"], "temperature must be above 0"),
    (["--source", "local"], "--source local"),
    (["--ckpt", "a.pt", "--weights", "b.pt"], "only one of them"),
    (["--weights", "missing.pt"], "does not exist"),
    (["--max-new-tokens", "500"], "ask for at most"),
])
def test_bad_generate_inputs_exit_2_with_one_line(capsys, tiny_gpt2_dir, argv, message):
    base = ["generate", "--model", str(tiny_gpt2_dir), "--prompt", PROMPT]
    if "--prompt" in argv:
        base = base[:3]
    rc, out, err = run_cli(capsys, *base, *argv)
    assert rc == 2 and out == ""
    assert message in error_line(err)


def test_uncached_hub_model_offline_says_so(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "gptlab-tests/never-downloaded"
    rc, out, err = run_cli(capsys, "generate", "--model", spec, "--prompt", PROMPT)
    assert (rc, out, err) == (2, "", f"error: {offline_message(spec)}\n")


# -- bare state dicts, checkpoints ----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_state_dict_files(tiny_gpt2_dir, tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("statedicts")
    sd = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).state_dict()
    torch.save(sd, folder / "gpt2_weights.pt")
    stripped = {k.removeprefix("transformer."): v.clone() for k, v in sd.items() if k != "lm_head.weight"}
    save_file(stripped, folder / "stripped.safetensors")
    return folder / "gpt2_weights.pt", folder / "stripped.safetensors"


def _greedy_out(capsys, *model_args):
    rc, out, err = run_cli(capsys, "generate", *model_args, "--prompt", PROMPT, "--greedy", "--max-new-tokens", 10,
                           "--device", "cpu")
    assert rc == 0, err
    return out


def test_bare_state_dict_loads_with_sizes_from_the_model_folder(capsys, tiny_gpt2_dir, hf_state_dict_files):
    pt, st = hf_state_dict_files
    reference = _greedy_out(capsys, "--model", tiny_gpt2_dir)
    assert _greedy_out(capsys, "--model", tiny_gpt2_dir, "--weights", pt) == reference
    assert _greedy_out(capsys, "--model", tiny_gpt2_dir, "--ckpt", pt, "--source", "local") == reference
    assert _greedy_out(capsys, "--model", tiny_gpt2_dir, "--checkpoint", st, "--source", "local") == reference


def test_bare_state_dict_model_matches_hf_logits(tiny_gpt2_dir, hf_state_dict_files):
    from core.models.statedict import load_state_dict_model

    hf = load_model(str(tiny_gpt2_dir))
    lm = load_state_dict_model(hf_state_dict_files[0], str(tiny_gpt2_dir))
    assert lm.family == "gptlab"
    assert lm.model.lm_head.weight is lm.model.transformer.wte.weight  # tied, as in GPT-2
    assert lm.model.num_params() == sum(p.numel() for p in hf.model.parameters())
    ids = torch.tensor([hf.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        diff = (lm.model(ids) - hf.model(ids).logits).abs().max().item()
    assert diff < 1e-5


def test_our_own_layout_state_dict_loads(capsys, tmp_path, tiny_gptlab_dir):
    from core.models.statedict import load_state_dict_model

    ours = load_model(str(tiny_gptlab_dir))
    torch.save(ours.model.state_dict(), tmp_path / "ours.pt")
    lm = load_state_dict_model(tmp_path / "ours.pt", str(tiny_gptlab_dir))
    for k, v in ours.model.state_dict().items():
        assert torch.equal(v, lm.model.state_dict()[k]), k
    assert _greedy_out(capsys, "--model", tiny_gptlab_dir, "--weights", tmp_path / "ours.pt") == \
        _greedy_out(capsys, "--model", tiny_gptlab_dir)


def test_state_dict_without_a_size_says_what_to_pass(capsys, hf_state_dict_files):
    rc, out, err = run_cli(capsys, "generate", "--weights", hf_state_dict_files[0], "--prompt", PROMPT)
    assert rc == 2 and "not a standard GPT-2 size" in error_line(err)
    rc, _, err = run_cli(capsys, "generate", "--model", "gpt2-medium", "--weights", hf_state_dict_files[0],
                         "--prompt", PROMPT)
    assert rc == 2 and "lack" in error_line(err)


def test_gpt2_sizes_come_from_the_spec_or_the_tensors():
    from core.models.statedict import config_for_spec

    meta = dict(device="meta")
    sd = {"transformer.wte.weight": torch.empty(50257, 1024, **meta),
          "transformer.wpe.weight": torch.empty(1024, 1024, **meta),
          **{f"transformer.h.{i}.ln_1.weight": torch.empty(1024, **meta) for i in range(24)}}
    cfg, folder = config_for_spec("default", sd)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.vocab_size, cfg.block_size, folder) == \
        (24, 16, 1024, 50257, 1024, None)
    cfg, _ = config_for_spec("openai-community/gpt2-xl", {})
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.vocab_size, cfg.block_size) == (48, 25, 1600, 50257, 1024)
    with pytest.raises(LabError, match="does not say which GPT-2 size"):
        config_for_spec("EleutherAI/gpt-neo-125M", sd)


def test_weights_auto_loads_the_model_spec(capsys, tiny_gpt2_dir):
    assert _greedy_out(capsys, "--model", tiny_gpt2_dir, "--weights", "auto") == \
        _greedy_out(capsys, "--model", tiny_gpt2_dir)


def test_run_folder_stands_for_its_latest_checkpoint(capsys, tmp_path, tiny_gptlab_dir):
    run = tmp_path / "runs" / "r1"
    for step in ("5", "20", "100"):
        shutil.copytree(tiny_gptlab_dir, run / "checkpoints" / step)
    (run / "config.json").write_text('{"objective": "ar", "steps": 100}')  # the run's own config
    (run / "checkpoints" / "100" / "config.json").unlink()  # still being written
    assert latest_checkpoint(run) == run / "checkpoints" / "20"
    assert _greedy_out(capsys, "--ckpt", run) == _greedy_out(capsys, "--model", tiny_gptlab_dir)
    empty = tmp_path / "runs" / "r2"
    (empty / "checkpoints").mkdir(parents=True)
    rc, _, err = run_cli(capsys, "generate", "--ckpt", empty, "--prompt", PROMPT)
    assert rc == 2 and "has no checkpoint yet" in error_line(err)


# -- models ---------------------------------------------------------------------------------------

def test_models_lists_default_hub_checkpoints_and_presets(capsys, monkeypatch, tmp_path, tiny_gptlab_dir):
    import huggingface_hub.constants as hub_constants

    from core.models.gpt import GPT, GPTConfig, preset_config

    cache = tmp_path / "hub"
    snap = cache / "models--gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_text("")
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    runs = tmp_path / "runs"
    shutil.copytree(tiny_gptlab_dir, runs / "r1" / "checkpoints" / "40")

    rc, out, _ = run_cli(capsys, "models", "--json", "--runs", runs)
    assert rc == 0
    info = json.loads(out)
    assert info["default"]["spec"] == "default" and info["default"]["untrained"] is False
    assert [h["id"] for h in info["hub"]] == KNOWN_HUB_MODELS
    assert {h["id"]: h["cached"] for h in info["hub"]}["gpt2"] is True
    assert not any(h["cached"] for h in info["hub"] if h["id"] != "gpt2")
    (ckpt,) = info["checkpoints"]
    assert (ckpt["run"], ckpt["step"], ckpt["spec"]) == ("r1", 40, str(runs / "r1" / "checkpoints" / "40"))
    assert ckpt["parameters"] == load_model(ckpt["spec"]).model.num_params()
    presets = {p["name"]: p["parameters"] for p in info["presets"]}
    assert presets["gpt2-small"] == 124_439_808  # GPT-2 small's published count
    with torch.device("meta"):
        assert presets["tiny"] == GPT(preset_config("tiny", vocab_size=50257, block_size=1024)).num_params()
        untied = GPTConfig(vocab_size=99, block_size=16, n_layer=2, n_head=2, d_model=8, bias=False,
                           tie_weights=False, mlp_expansion=3)
        assert untied.n_params == GPT(untied).num_params()

    rc, text, _ = run_cli(capsys, "models", "--runs", runs)
    assert rc == 0 and "state: trained" in text and "r1/checkpoints/40" in text
    assert "gpt2-medium" in text and "not cached" in text and "124,439,808" in text
