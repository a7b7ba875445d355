"""Bad input at the command line: every command answers a missing, unknown or out-of-range
argument with exit code 2 and exactly one line on stderr that names the flag, never a usage block
or a traceback; ``--help`` lists the commands one a line; ``--trust-remote-code`` stays off
unless given, and warns when it is."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.commands.cli import TRUST_REMOTE_CODE_WARNING, build_parser, command_modules, main

ROOT = Path(__file__).resolve().parents[2]

# (argv, text the one line must contain: the offending flag, action or value)
BAD_INPUTS = [
    # generate
    (["generate", "--prompt"], "--prompt"),
    (["generate", "--prompt", "hi", "--frobnicate"], "--frobnicate"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
    (["generate", "--prompt", "hi", "--temperature", "-0.5"], "--temperature must be 0 or more"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "--top-k"),
    (["generate", "--prompt", "hi", "--num-beams", "0"], "--num-beams"),
    (["generate", "--prompt", "hi", "--device", "tpu"], "--device"),
    (["generate", "--prompt", "hi", "--dtype", "float8"], "--dtype"),
    (["generate", "--prompt", "hi", "--model", "./no/such/model"], "--model"),
    # validate
    (["validate", "--model"], "--model"),
    (["validate", "--frobnicate"], "--frobnicate"),
    (["validate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["validate", "--device", "tpu"], "--device"),
    (["validate", "--model", "./no/such/model"], "--model ./no/such/model"),
    (["validate", "--weights", "missing.pt"], "--weights missing.pt"),
    # models
    (["models", "--runs"], "--runs"),
    (["models", "--frobnicate"], "--frobnicate"),
    (["models", "--runs", "no-such-folder"], "--runs no-such-folder"),
    # consensus
    (["consensus", "--size"], "--size"),
    (["consensus", "--prompt", "hi", "--frobnicate"], "--frobnicate"),
    (["consensus", "--prompt", "hi", "--size", "0"], "--size must be at least 1"),
    (["consensus", "--prompt", "hi", "--randomprompt", "1"], "--randomprompt"),
    (["consensus", "--prompt", "hi", "--record-every", "0"], "--record-every"),
    (["consensus", "--prompt", "hi", "--use-model", "3", "--top-p", "2"], "--top-p"),
    (["consensus", "--prompt", "hi", "--memory-budget", "0"], "--memory-budget"),
    (["consensus", "--prompt", "hi", "--size", "2", "--decode", "5"], "--decode 5"),
    (["consensus", "--prompt", "hi", "--device", "cuda:x"], "--device"),
    # train
    (["train", "--batch-size"], "--batch-size"),
    (["train", "--frobnicate"], "--frobnicate"),
    (["train", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["train", "--d-model", "30", "--n-head", "4"], "--d-model 30 is not divisible by --n-head 4"),
    (["train", "--lr", "0"], "--lr must be above 0"),
    (["train", "--val-fraction", "0.7"], "--val-fraction"),
    (["train", "--device", "tpu"], "--device"),
    (["train", "--preset", "huge"], "--preset huge"),
    (["train", "--vocab-size", "10"], "--vocab-size 10"),
    (["train", "--dataset", "./no/such/corpus.txt"], "--dataset"),
    (["train", "--resume", "./no/such/run"], "--resume"),
    # runs and its actions
    (["runs"], "runs {list,status,stop,resume,delete}"),
    (["runs", "frobnicate"], "'frobnicate'"),
    (["runs", "list", "--frobnicate"], "--frobnicate"),
    (["runs", "list", "--root", "no-such-folder"], "--root no-such-folder"),
    (["runs", "status"], "RUN"),
    (["runs", "status", "some-run", "--log", "-1"], "--log must be 0 or more"),
    (["runs", "stop", "some-run", "--wait", "-1"], "--wait must be 0 or more"),
    (["runs", "resume", "some-run", "--max-steps", "0"], "--max-steps must be between 1 and"),
    (["runs", "delete"], "RUN"),
    # serve
    (["serve", "--port"], "--port"),
    (["serve", "--frobnicate"], "--frobnicate"),
    (["serve", "--port", "70000"], "--port must be between 0 and 65535"),
    (["serve", "--max-queue", "-1"], "--max-queue must be 0 or more"),
    (["serve", "--queue-timeout", "0"], "--queue-timeout must be above 0"),
    (["serve", "--host", " "], "--host is empty"),
    # export
    (["export"], "--to"),
    (["export", "--to"], "--to"),
    (["export", "--to", "out", "--frobnicate"], "--frobnicate"),
    (["export", "--to", "out", "--format", "gguf"], "--format"),
    (["export", "--to", "out", "--dtype", "int8"], "--dtype"),
    (["export", "--to", " "], "--to is empty"),
    (["export", "--to", "out", "--model", "./no/such/model"], "./no/such/model does not exist"),
    # transcoders and its actions
    (["transcoders"], "transcoders {train,collect,describe,explain,export,import}"),
    (["transcoders", "frobnicate"], "'frobnicate'"),
    (["transcoders", "train", "--model"], "--model"),
    (["transcoders", "train", "--frobnicate"], "--frobnicate"),
    (["transcoders", "train", "--expansion", "0"], "--expansion must be at least 1"),
    (["transcoders", "train", "--lr", "-1"], "--lr must be above 0"),
    (["transcoders", "collect", "--window", "4"], "--window"),
    (["transcoders", "collect", "--top-k", "0"], "--top-k must be at least 1"),
    (["transcoders", "describe", "--n-top", "0"], "--n-top must be at least 1"),
    (["transcoders", "describe", "--explainer-device", "tpu"], "--explainer-device"),
    (["transcoders", "explain", "--prompt"], "--prompt"),
    (["transcoders", "explain", "--prompt", "hi", "--top-p", "2"], "--top-p"),
    (["transcoders", "explain", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["transcoders", "explain", "--prompt", "hi", "--model", "./no/such/model"], "--model"),
    (["transcoders", "export"], "--to"),
    (["transcoders", "export", "--to", "out", "--format", "onnx"], "--format"),
    (["transcoders", "export", "--to", "", "--transcoders", "set"], "--to is empty"),
    (["transcoders", "export", "--to", ".", "--format", "neuronpedia", "--store", "x.sqlite"], "--to . is the working"),
    (["transcoders", "import"], "--from"),
    (["transcoders", "import", "--from", "x", "--fold-ln", "maybe"], "--fold-ln"),
    (["transcoders", "import", "--from", "./no/such/folder", "--to", "set"], "--from ./no/such/folder: no such folder"),
]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty working folder and runs root, so a bad input that wrote anything would show."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return tmp_path


def one_error_line(err: str) -> str:
    """stderr must be exactly one non-empty line, and an error."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 10, line
    return line


@pytest.mark.parametrize("argv, names", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_naming_the_flag(sandbox, capsys, argv, names):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out
    assert names in one_error_line(err)
    assert list(sandbox.iterdir()) == []  # nothing was written on the way to the error


def test_every_command_has_at_least_three_bad_inputs():
    counts = {m.NAME: 0 for m in command_modules()}
    for argv, _ in BAD_INPUTS:
        counts[argv[0]] += 1
    assert min(counts.values()) >= 3, counts
    for action in ("list", "status", "stop", "resume", "delete"):
        assert any(a[:2] == ["runs", action] for a, _ in BAD_INPUTS), action
    for action in ("train", "collect", "describe", "explain", "export", "import"):
        assert sum(a[:2] == ["transcoders", action] for a, _ in BAD_INPUTS) >= 2, action


@pytest.mark.parametrize("argv, help_of", [
    (["--frobnicate"], "python -m core"),
    (["train", "--frobnicate"], "python -m core train"),
    (["transcoders", "explain", "--frobnicate"], "python -m core transcoders explain"),
    (["runs", "stop", "x", "--wait", "soon"], "python -m core runs"),
])
def test_usage_errors_point_at_the_right_help(capsys, argv, help_of):
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"(see `{help_of} --help`)"), line


def test_argparse_wording_is_reshaped_around_the_flag(capsys):
    assert main(["generate", "--top-k", "many"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: --top-k: invalid int value: 'many'; pass a whole number (see `python -m core generate --help`)")
    assert main(["generate", "--temprature", "0.5"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: unknown flag --temprature; did you mean --temperature? (see `python -m core generate --help`)")
    assert main(["frobnicate"]) == 2
    names = ", ".join(m.NAME for m in command_modules())
    assert one_error_line(capsys.readouterr().err) == (
        f"error: unknown command 'frobnicate'; choose one of {names} (see `python -m core --help`)")


def test_no_command_is_one_line_naming_the_commands(capsys):
    assert main([]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(m.NAME in line for m in command_modules())


@pytest.mark.parametrize("argv", [["train", "--batch-size", "0"], ["generate", "--top-p", "1.5"],
                                  ["transcoders", "explain", "--frobnicate"]])
def test_real_entry_point_prints_the_same_line(tmp_path, capsys, argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPTLAB_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "core", *argv], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert main(argv) == 2
    assert proc.stderr == capsys.readouterr().err
    one_error_line(proc.stderr)


# -- --help ---------------------------------------------------------------------------------------

def test_root_help_lists_every_command_on_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    mods = command_modules()
    assert {m.NAME for m in mods} >= {"generate", "validate", "models", "consensus", "train", "runs", "transcoders"}
    for mod in mods:
        rows = [ln for ln in lines if ln.split()[:1] == [mod.NAME]]
        assert len(rows) == 1, (mod.NAME, rows)
        assert rows[0].split(None, 1)[1] == mod.HELP.strip()  # the whole HELP, unwrapped
    assert "Run `python -m core <command> --help`" in out


# -- trust_remote_code ----------------------------------------------------------------------------

@pytest.fixture
def hf_calls(monkeypatch):
    """Every transformers from_pretrained call the loaders make, with its keyword arguments."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    calls: list[tuple[str, dict]] = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def _generate(tiny_gpt2_dir, *extra: str) -> list[str]:
    return ["generate", "--model", str(tiny_gpt2_dir), "--prompt", "Once upon", "--greedy", "--max-new-tokens", "2",
            *extra]


def test_remote_code_is_off_by_default(tiny_gpt2_dir, hf_calls, capsys):
    assert main(_generate(tiny_gpt2_dir)) == 0
    err = capsys.readouterr().err
    assert "--trust-remote-code" not in err
    assert {name for name, _ in hf_calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kw.get("trust_remote_code", "missing") is False for _, kw in hf_calls), hf_calls


def test_the_flag_passes_true_and_warns_first(tiny_gpt2_dir, hf_calls, capsys):
    assert main(_generate(tiny_gpt2_dir, "--trust-remote-code")) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == TRUST_REMOTE_CODE_WARNING
    assert err.count("--trust-remote-code") == 1
    assert "Python code shipped with the model" in TRUST_REMOTE_CODE_WARNING
    assert {name for name, _ in hf_calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kw["trust_remote_code"] is True for _, kw in hf_calls), hf_calls


def test_every_model_loading_command_has_the_flag():
    parser = build_parser()
    for argv in (["generate"], ["consensus"], ["validate"], ["transcoders", "train"], ["transcoders", "collect"],
                 ["transcoders", "describe"], ["transcoders", "explain"]):
        assert parser.parse_args(argv).trust_remote_code is False, argv
        assert parser.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True, argv


def test_validate_passes_the_flag_on(monkeypatch, capsys):
    import core.models.validate
    from core.errors import LabError

    seen = {}

    def fake_validate(spec, **kwargs):
        seen.update(kwargs)
        raise LabError("stop here.")

    monkeypatch.setattr(core.models.validate, "validate_gpt2", fake_validate)
    assert main(["validate", "--model", "gpt2", "--trust-remote-code"]) == 2
    assert seen["trust_remote_code"] is True
    assert capsys.readouterr().err.splitlines() == [TRUST_REMOTE_CODE_WARNING, "error: stop here."]
    assert main(["validate", "--model", "gpt2"]) == 2
    assert seen["trust_remote_code"] is False


def test_a_model_with_its_own_code_is_refused_without_running_it(own_code_model, capsys):
    folder, marker = own_code_model
    assert main(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "ships its own Python code" in line and "--trust-remote-code" in line
    assert not marker.exists()


def test_a_run_too_big_for_the_machine_is_refused_before_anything_is_written(sandbox, capsys):
    rc = main(["train", "--n-layer", "1024", "--d-model", "65536", "--n-head", "64", "--device", "cpu",
               "--max-steps", "1", "--output-dir", str(sandbox / "big")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "needs about" in line and "fewer layers" in line
    assert list(sandbox.iterdir()) == []


@pytest.mark.parametrize("exc, rc, words", [
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 51539607552 bytes"), 2,
     "ran out of memory"),
    (ValueError("something nobody expected\nsecond line"), 1, "unexpected ValueError: something nobody expected"),
])
def test_an_unexpected_failure_is_still_one_line(sandbox, capsys, monkeypatch, exc, rc, words):
    import core.commands.models as models

    def boom(args):
        raise exc

    monkeypatch.setattr(models, "run", boom)
    assert main(["models"]) == rc
    assert words in one_error_line(capsys.readouterr().err)
    monkeypatch.setenv("GPTLAB_DEBUG", "1")
    if rc == 1:
        with pytest.raises(ValueError):
            main(["models"])
