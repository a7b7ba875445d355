"""`python -m core export`: the folder is written and loadable, a run folder stands for its latest
checkpoint, every refusal is one line with exit 2 and touches nothing, the output folder is checked
before the model loads, and `--help` still imports no torch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.commands.cli import main
from core.models import export as export_mod

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error") for ln in lines) == 1, err
    return lines[-1]


def test_export_writes_a_folder_transformers_loads(capsys, tmp_path, tiny_gptlab_dir):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    rc, out, err = run_cli(capsys, "export", "--model", tiny_gptlab_dir, "--to", tmp_path / "hf", "--format", "hf")
    assert rc == 0, err
    assert out.startswith(f"wrote {tmp_path / 'hf'} (hf: GPT2LMHeadModel") and "model.safetensors" in out
    assert "Traceback" not in err and "Writing model shards" not in err
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), GPT2LMHeadModel)


def test_dtype_flag_sets_the_saved_weights(capsys, tmp_path, tiny_gptlab_dir):
    rc, out, err = run_cli(capsys, "export", "--model", tiny_gptlab_dir, "--to", tmp_path / "hf", "--dtype", "float16")
    assert rc == 0, err
    assert "in float16" in out and '"dtype": "float16"' in (tmp_path / "hf" / "config.json").read_text()


def test_a_run_folder_stands_for_its_latest_checkpoint(capsys, tmp_path, tiny_gptlab_dir):
    run = tmp_path / "runs" / "r1"
    for step in ("5", "10"):
        shutil.copytree(tiny_gptlab_dir, run / "checkpoints" / step)
    rc, out, err = run_cli(capsys, "export", "--model", run, "--to", tmp_path / "hf")
    assert rc == 0, err
    assert f"latest checkpoint of {run}" in err
    assert str(run / "checkpoints" / "10") in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("spec, words", [
    ("{diffusion}", "is a masked-diffusion model"),
    ("{hf}", "is a Hugging Face model folder, which transformers loads as it is; use it directly"),
    ("gpt2", "'gpt2' names a Hugging Face model, which is in transformers' format already; use it directly"),
    ("./no/such/checkpoint", "does not exist"),
])
def test_models_that_cannot_be_exported_are_refused_in_one_line(capsys, tmp_path, tiny_diffusion_dir,
                                                                  tiny_gpt2_dir, spec, words):
    spec = spec.format(diffusion=tiny_diffusion_dir, hf=tiny_gpt2_dir)
    rc, out, err = run_cli(capsys, "export", "--model", spec, "--to", tmp_path / "hf")
    assert rc == 2 and out == ""
    assert words in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fill, words", [
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "is a model folder"),
    (lambda p: (p.mkdir(), (p / "keep.txt").write_text("mine")), "is not empty"),
    (lambda p: p.write_text("a file"), "is a file"),
])
def test_the_output_folder_is_checked_before_the_model_loads(capsys, tmp_path, tiny_gptlab_dir, monkeypatch,
                                                             fill, words):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model loaded before --to was checked")

    monkeypatch.setattr(export_mod, "load_model", must_not_load)
    target = tmp_path / "out"
    fill(target)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc, out, err = run_cli(capsys, "export", "--model", tiny_gptlab_dir, "--to", target)
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith("error: --to ") and words in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing overwritten


def test_an_empty_existing_folder_is_filled(capsys, tmp_path, tiny_gptlab_dir):
    (tmp_path / "hf").mkdir()
    rc, _, err = run_cli(capsys, "export", "--model", tiny_gptlab_dir, "--to", tmp_path / "hf")
    assert rc == 0, err
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, words", [
    ([], "--to"),
    (["--to", "x", "--format", "gguf"], "--format: invalid choice"),
    (["--to", "x", "--dtype", "int8"], "--dtype: invalid choice"),
])
def test_bad_flags_are_one_line(capsys, argv, words):
    rc, out, err = run_cli(capsys, "export", *argv)
    assert rc == 2 and out == "" and words in one_error_line(err)


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"]])
def test_help_imports_no_torch(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "core", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "export" in proc.stdout
    torch_lines = [ln for ln in proc.stderr.splitlines() if "torch" in ln]
    assert torch_lines == [], torch_lines[:5]
