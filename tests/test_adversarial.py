"""The adversarial pass, as tests: every command and every file-writing flag tried the way an attacker
or a tired user would (issue "Nothing lost, nothing run unasked").

The contract every case is held to (:func:`contract`):

- exit code 0 or 2, never 1, never "unexpected ... (a bug in GPT Lab)", never a traceback;
- an error is exactly one ``error: ...`` line, the last on stderr;
- nothing outside the asked-for output changes or disappears: the shipped ``assets/`` (by stat),
  the lab's folders (by content) and the working folder are compared before and after;
- no hang: every call runs under a deadline;
- no code from a model folder runs: the custom-code folders below write a sentinel file when their
  code is imported, and the sentinel never appears;
- no link is followed out of a model, run or transcoder-set folder: a secret behind such a link
  never shows, and the file behind it never changes.

Classes (the numbers of the issue): 1 data loss, 2 concurrent writers, 3 code or links followed
unasked, 4 an exception instead of a sentence, 5 silent nonsense, 6 memory over budget,
7 leftovers. Most cases call ``core.commands.cli.main`` in this process; real processes only where
they are the point (concurrency, a real stdin, the server).

Never point a case at the real /dev/null: run as root, a broken check would replace the device
with a file for everyone on the machine. The "device" here is a FIFO of the test's own.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.commands import cli
from core.commands.cli import build_parser, main

from tests.conftest import CORPUS, kill_process_groups

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
SECRET = "root:$6$adversary-secret:19000:0:99999:7:::"
BIG = str(10**20)
ABSURD = ["0", "-1", "1e30", "nan", "inf", BIG]
AS_ROOT = os.geteuid() == 0


# -- the contract -------------------------------------------------------------------------------------

class Deadline(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Deadline in this (main) thread when the block runs longer than ``seconds``."""
    def ring(signum, frame):
        raise Deadline(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def call(argv, stdin: bytes = b"", seconds: float = 60) -> tuple[int, str, str]:
    """``main(argv)`` in this process with ``stdin`` bytes, under a deadline: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), deadline(seconds):
            rc = main([str(a) for a in argv])
    finally:
        sys.stdin = saved
    return rc, out.getvalue(), err.getvalue()


def contract(rc: int, out: str, err: str) -> str | None:
    """Assert the contract on one finished command; returns its error line (None on success)."""
    assert rc in (0, 2), (rc, err[-800:])
    assert "Traceback" not in out + err and "unexpected" not in err and "a bug in GPT Lab" not in err, err[-800:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    if rc == 0:
        assert not errors, err[-800:]
        return None
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err[-800:]
    assert errors[0].startswith("error: ") and len(errors[0]) > 20 and "\n" not in errors[0]
    return errors[0]


def digest(*roots: Path, stat_only: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file and link under ``roots`` with its content hash (link: its target); under
    ``stat_only`` (the shipped assets, tens of megabytes) size, mtime and inode stand for content."""
    found = {}
    for root in (*roots, *stat_only):
        if not os.path.lexists(root):
            continue
        quick = root in stat_only
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                if p.is_symlink():
                    found[str(p)] = "link:" + os.readlink(p)
                elif p.is_file():
                    st = p.stat()
                    found[str(p)] = (f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" if quick else
                                     hashlib.sha1(p.read_bytes()).hexdigest())
                elif not p.is_dir():
                    found[str(p)] = "special"
    return found


def changed(before: dict, after: dict, allowed: tuple[Path, ...] = ()) -> list[str]:
    """Paths added, removed or rewritten, except under ``allowed`` (the asked-for outputs)."""
    keys = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return sorted(k for k in keys if not any(k == str(a) or k.startswith(str(a) + os.sep) for a in allowed))


# -- the lab: tiny models, a run, a transcoder set, hostile folders --------------------------------------

TINY_TRAIN = ["--vocab-size", "320", "--device", "cpu", "--n-layer", "1", "--n-head", "2", "--d-model", "16",
              "--block-size", "32", "--batch-size", "4", "--log-every", "1", "--val-every", "0", "--no-progress"]
TINY_SET = ["--device", "cpu", "--expansion", "2", "--k", "4", "--steps", "4", "--batch-tokens", "64", "--seq-len", "16",
            "--collect-tokens", "512", "--collect-seq-len", "16", "--top-k", "3", "--n-quantile", "2", "--n-heldout", "2",
            "--n-negative", "2", "--window", "2", "1", "--collect-batch", "8"]
CUSTOM_CODE = """import pathlib
pathlib.Path({sentinel!r}).write_text("the model's own code ran")
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
class CustomConfig(GPT2Config):
    model_type = "gptlab_adversary"
class CustomModel(GPT2LMHeadModel):
    config_class = CustomConfig
class CustomTok(PreTrainedTokenizerFast):
    pass
"""


class Lab:
    """Paths of the module's shared, never-modified material (cases copy what they change)."""

    def __init__(self, base: Path, gptlab: Path, gpt2: Path):
        self.base = base
        self.ckpt = base / "ckpt"
        self.hf = base / "hf"
        shutil.copytree(gptlab, self.ckpt)
        shutil.copytree(gpt2, self.hf)
        self.text = base / "corpus.txt"
        self.text.write_text(CORPUS * 3)
        self.cache = base / "cache"
        self.runs = base / "runs"
        self.set = base / "set"
        self.secret = base / "shadow"
        self.secret.write_text(SECRET + "\n")
        self.sentinel = base / "SENTINEL"
        self.custom = base / "custom-model"
        self.custom_tok = base / "custom-tokenizer"

    def build(self) -> None:
        env = {"GPTLAB_RUNS": str(self.runs), "GPTLAB_DATA_CACHE": str(self.cache)}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            rc, _, err = call(["train", "--dataset", self.text, *TINY_TRAIN, "--max-steps", "2", "--save-every", "2",
                               "--run-name", "r1"], seconds=120)
            assert rc == 0, err
            rc, _, err = call(["transcoders", "train", "--model", self.ckpt, "--output-dir", self.set, "--dataset",
                               self.text, *TINY_SET], seconds=120)
            assert rc == 0, err
        self.run = self.runs / "r1"
        self.run_ckpt = self.run / "checkpoints" / "2"
        # a model folder whose own code writes the sentinel when imported (refused without --trust-remote-code)
        shutil.copytree(self.hf, self.custom)
        (self.custom / "custom.py").write_text(CUSTOM_CODE.format(sentinel=str(self.sentinel)))
        cfg = json.loads((self.custom / "config.json").read_text())
        cfg.update(model_type="gptlab_adversary",
                   auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
        (self.custom / "config.json").write_text(json.dumps(cfg))
        # a tokenizer folder whose own class is its code
        self.custom_tok.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(self.hf / name, self.custom_tok / name)
        (self.custom_tok / "custom.py").write_text(CUSTOM_CODE.format(sentinel=str(self.sentinel)))
        tc = json.loads((self.custom_tok / "tokenizer_config.json").read_text())
        tc.update(tokenizer_class="CustomTok", auto_map={"AutoTokenizer": ["custom.CustomTok", "custom.CustomTok"]})
        (self.custom_tok / "tokenizer_config.json").write_text(json.dumps(tc))
        shutil.copy(self.custom_tok / "tokenizer_config.json", self.custom / "tokenizer_config.json")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_gptlab_dir, tiny_gpt2_dir) -> Lab:
    lab = Lab(tmp_path_factory.mktemp("lab"), tiny_gptlab_dir, tiny_gpt2_dir)
    lab.build()
    return lab


@pytest.fixture
def sandbox(lab, tmp_path, monkeypatch):
    """A working folder of the case's own, the lab's runs root and token cache, and after the case:
    the sentinel never appeared, the lab and the shipped assets are as they were (any
    detached process a case started is ended)."""
    from core.training import runs as runs_mod

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GPTLAB_RUNS", str(lab.runs))
    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(lab.cache))
    children = set(runs_mod._CHILDREN)
    before = digest(lab.ckpt, lab.hf, lab.set, lab.run, lab.secret, lab.custom, lab.custom_tok, stat_only=(ASSETS,))
    yield work
    ours = {pid: p for pid, p in runs_mod._CHILDREN.items() if pid not in children}
    kill_process_groups(ours)
    assert not lab.sentinel.exists(), "a model folder's own code ran without --trust-remote-code"
    after = digest(lab.ckpt, lab.hf, lab.set, lab.run, lab.secret, lab.custom, lab.custom_tok, stat_only=(ASSETS,))
    assert changed(before, after) == []


def places(tmp: Path) -> dict[str, str]:
    """Where a tired user (or an attacker) points an output: each must be refused before any work."""
    folder = tmp / "a-folder"
    folder.mkdir(exist_ok=True)
    file = tmp / "a-file.txt"
    file.write_text("keep me")
    fifo = tmp / "a-fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    if AS_ROOT:  # root writes through permissions; a pseudo file system refuses even root
        read_only = "/proc/gptlab-adversary/out"
    else:
        ro = tmp / "read-only"
        ro.mkdir(exist_ok=True)
        ro.chmod(0o500)
        read_only = str(ro / "out")
    return {"folder": str(folder), "folder/": str(folder) + os.sep, "file as parent": str(file / "out"),
            "file as grandparent": str(file / "deeper" / "out"), "name too long": str(tmp / ("n" * 300)),
            "empty": "", "blank": "  ", "device (a FIFO)": str(fifo), "read-only place": read_only}


# == 4/5. every flag that writes, pointed at places it cannot or must not write =========================

def _model(lab):
    return ["--model", lab.ckpt, "--device", "cpu"]


WRITERS = {  # name -> (argv before the flag, the flag, argv after it); {lab} fields filled per case
    "generate --json": (lambda lab: ["generate", *_model(lab), "--prompt", "hi", "--max-new-tokens", "1"], "--json"),
    "validate --json": (lambda lab: ["validate", "--model", lab.hf, "--gen-prompt", "hi", "--max-new-tokens", "1"],
                        "--json"),
    "consensus --savefile": (lambda lab: ["consensus", *_model(lab), "--prompt", "hi", "--size", "1"], "--savefile"),
    "consensus --eplot": (lambda lab: ["consensus", *_model(lab), "--prompt", "hi", "--size", "1"], "--eplot"),
    "consensus --matrixerror": (lambda lab: ["consensus", *_model(lab), "--prompt", "hi", "--size", "1"],
                                "--matrixerror"),
    "consensus --use-model --savefile": (lambda lab: ["consensus", *_model(lab), "--prompt", "hi", "--size", "1",
                                                      "--use-model", "1"], "--savefile"),
    "consensus --simulate --savefile": (lambda lab: ["consensus", "--simulate", "--size", "2", "--tokens", "4",
                                                     "--dim", "3", "--device", "cpu"], "--savefile"),
    "consensus --simulate --eplot": (lambda lab: ["consensus", "--simulate", "--size", "2", "--tokens", "4", "--dim",
                                                  "3", "--device", "cpu"], "--eplot"),
    "consensus --simulate --matrixerror": (lambda lab: ["consensus", "--simulate", "--size", "2", "--tokens", "4",
                                                        "--dim", "3", "--device", "cpu"], "--matrixerror"),
    "transcoders explain --json": (lambda lab: ["transcoders", "explain", *_model(lab), "--transcoders", lab.set,
                                                "--prompt", "hi", "--max-new-tokens", "1"], "--json"),
    "transcoders collect --store": (lambda lab: ["transcoders", "collect", *_model(lab), "--transcoders", lab.set,
                                                 "--dataset", lab.text, "--collect-tokens", "128",
                                                 "--collect-seq-len", "16"], "--store"),
    "transcoders train --output-dir": (lambda lab: ["transcoders", "train", *_model(lab), "--dataset", lab.text,
                                                    "--steps", "1", "--batch-tokens", "32", "--seq-len", "16",
                                                    "--expansion", "1", "--k", "2"], "--output-dir"),
    "transcoders train --transcoders": (lambda lab: ["transcoders", "train", *_model(lab), "--dataset", lab.text,
                                                     "--steps", "1", "--batch-tokens", "32", "--seq-len", "16",
                                                     "--expansion", "1", "--k", "2"], "--transcoders"),
    "train --output-dir": (lambda lab: ["train", "--dataset", lab.text, *TINY_TRAIN, "--max-steps", "1"],
                           "--output-dir"),
    "train --data-cache": (lambda lab: ["train", "--dataset", lab.text, *TINY_TRAIN, "--max-steps", "1"],
                           "--data-cache"),
}
# A --savefile prefix naming a folder writes FOLDER/consensus.npy (see the test below), and one naming
# a FIFO writes FIFO.npy beside it (a prefix is no file itself); a folder is what --output-dir and
# --data-cache want; those are not refusals.
FOLDER_OK = {"--savefile": ("folder", "folder/", "device (a FIFO)"), "--output-dir": ("folder", "folder/"),
             "--transcoders": ("folder", "folder/"), "--data-cache": ("folder", "folder/")}
PLACES = ["folder", "folder/", "file as parent", "file as grandparent", "name too long", "empty", "blank",
          "device (a FIFO)", "read-only place"]


@pytest.fixture
def no_work(monkeypatch):
    """Every kind of work a command can start fails the test loudly (as exit 1): places must be judged first."""
    def work(*a, **k):
        raise AssertionError("the work started before the output place was checked")

    monkeypatch.setattr(cli, "load_from_args", work)
    for module in ("generate", "consensus"):
        monkeypatch.setattr(f"core.commands.{module}.load_from_args", work)
    monkeypatch.setattr("core.models.validate.validate_gpt2", work)
    monkeypatch.setattr("core.consensus.simulation.simulation_stream", work)
    monkeypatch.setattr("core.training.trainer.train", work)
    monkeypatch.setattr("core.training.data.prepare_data", work)


BAD_PLACES = [(w, p) for w in WRITERS for p in PLACES if p not in FOLDER_OK.get(WRITERS[w][1], ())]


@pytest.mark.parametrize("writer, place", BAD_PLACES, ids=[f"{w}-{p}" for w, p in BAD_PLACES])
def test_every_writing_flag_refuses_a_bad_place_before_any_work(lab, sandbox, no_work, writer, place):
    build, flag = WRITERS[writer]
    target = places(sandbox)[place]
    before = digest(sandbox)
    line = contract(*call([*build(lab), flag, target]))
    assert line is not None and flag in line, line  # the sentence names the flag to change
    assert changed(before, digest(sandbox)) == []
    assert (sandbox / "a-file.txt").read_text() == "keep me"


FOREIGN_FOLDERS = ["model", "checkpoint", "run", "hf model", "transcoder set", "non-empty folder", "a file"]


def _foreign(lab, tmp: Path, kind: str) -> Path:
    """A copy of something that is not the output's to overwrite."""
    dest = tmp / kind.replace(" ", "-")
    src = {"model": lab.ckpt, "checkpoint": lab.run_ckpt, "run": lab.run, "hf model": lab.hf,
           "transcoder set": lab.set}.get(kind)
    if src is not None:
        shutil.copytree(src, dest, symlinks=True)
    elif kind == "non-empty folder":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    else:
        dest.write_text("mine")
    return dest


MAY_GO = {("transcoders train --output-dir", "transcoder set"),  # retraining a set in place
          ("transcoders train --transcoders", "transcoder set"),
          ("train --data-cache", "non-empty folder")}                # a cache folder with other caches in it
FOREIGN = ([(w, k) for w in ("train --output-dir", "transcoders train --output-dir", "transcoders train --transcoders",
                             "train --data-cache") for k in FOREIGN_FOLDERS if (w, k) not in MAY_GO]
           + [("transcoders collect --store", "a file")])


@pytest.mark.parametrize("writer, kind", FOREIGN, ids=[f"{w}-{k}" for w, k in FOREIGN])
def test_an_output_never_lands_on_a_model_a_run_or_a_users_files(lab, sandbox, writer, kind):
    """Class 1: `train --output-dir` over a checkpoint, `transcoders train --output-dir` over a model
    (it replaced the model's config.json), a token cache inside a model, a store over a text file."""
    build, flag = WRITERS[writer]
    target = _foreign(lab, sandbox, kind)
    before = digest(sandbox)
    line = contract(*call([*build(lab), flag, target, *(["--output-dir", sandbox / "new-run"]
                                                        if flag == "--data-cache" else [])]))
    assert line is not None, f"{writer} wrote into a {kind}"
    assert changed(before, digest(sandbox)) == []


def test_a_savefile_folder_is_written_inside_never_as_a_hidden_npy(lab, sandbox):
    out = sandbox / "results"
    out.mkdir()
    for prefix in (str(out), str(out) + os.sep):
        assert contract(*call(["consensus", *_model(lab), "--prompt", "hi", "--size", "1", "--savefile", prefix])) is None
        assert sorted(p.name for p in out.iterdir()) == ["consensus.npy", "consensus_hidden.npy"]
    assert not (out / ".npy").exists() and not (sandbox / ".npy").exists()


# == 1. runs commands never take a model, a set or the shipped model for a run ==========================

RUN_ACTIONS = ["status", "stop", "resume", "delete"]
NOT_RUNS = ["model", "hf model", "transcoder set", "folder with a config.json", "shipped model"]


@pytest.mark.parametrize("action", RUN_ACTIONS)
@pytest.mark.parametrize("kind", NOT_RUNS)
def test_runs_commands_touch_only_runs(lab, sandbox, action, kind):
    if kind == "shipped model":
        target = ASSETS / "default"
        if not (target / "config.json").is_file():
            pytest.skip("no shipped model in this checkout")
    elif kind == "folder with a config.json":
        target = sandbox / "looks-like-a-run"
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "status.json").write_text(json.dumps({"state": "finished"}))
        (target / "metrics.jsonl").write_text("")
    else:
        target = _foreign(lab, sandbox, kind)
    before = digest(sandbox, stat_only=(ASSETS,))
    for spelled in (str(target), str(target) + os.sep):
        line = contract(*call(["runs", action, spelled, "--root", lab.runs]))
        assert line is not None and ("is not a training run GPT Lab made" in line or "No training run" in line), line
    assert changed(before, digest(sandbox, stat_only=(ASSETS,))) == []


# == 2. concurrent writers ============================================================================

def _env(lab) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "GPTLAB_RUNS": str(lab.runs), "GPTLAB_DATA_CACHE": str(lab.cache), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _together(lab, *argvs, cwd: Path, seconds: float = 120) -> list[tuple[int, str]]:
    """Start every command at once as a real process; (exit code, stderr) of each."""
    procs = [subprocess.Popen([sys.executable, "-m", "core", *map(str, a)], cwd=cwd, env=_env(lab), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              start_new_session=True) for a in argvs]
    done = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=seconds)
            done.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rc, err in done:
        contract(rc, "", err)
    return done


def test_two_trains_into_one_new_folder_never_share_it(lab, sandbox):
    out = sandbox / "run"
    argv = ["train", "--dataset", lab.text, *TINY_TRAIN, "--max-steps", "3", "--output-dir", out]
    codes = sorted(rc for rc, _ in _together(lab, argv, argv, cwd=sandbox))
    assert codes in ([0, 0], [0, 2]), codes
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one run, each step once: the second was refused (or found the folder taken)


def test_transcoder_writers_of_one_set_take_turns(lab, sandbox):
    from core.interp.store import FeatureStore
    from core.interp.transcoder import load_transcoder_set

    out = sandbox / "set"
    shutil.copytree(lab.set, out)
    train = ["transcoders", "train", "--model", lab.ckpt, "--output-dir", out, "--dataset", lab.text, *TINY_SET]
    collect = ["transcoders", "collect", "--model", lab.ckpt, "--device", "cpu", "--transcoders", out, "--dataset",
               lab.text, "--collect-tokens", "512", "--collect-seq-len", "16"]
    describe = ["transcoders", "describe", "--model", lab.ckpt, "--device", "cpu", "--transcoders", out]
    _together(lab, train, collect, describe, cwd=sandbox)
    load_transcoder_set(out)  # whoever won, the set and its store are whole
    with FeatureStore(out / "features.sqlite", readonly=True) as store:
        assert store.layers()


# == 3. code never run unasked, links never followed ==================================================

CUSTOM_CODE_CASES = {
    "generate --model": lambda lab: ["generate", "--model", lab.custom, "--prompt", "hi", "--max-new-tokens", "1"],
    "consensus --model": lambda lab: ["consensus", "--model", lab.custom, "--prompt", "hi", "--size", "1"],
    "consensus --simulate --qkv layer": lambda lab: ["consensus", "--simulate", "--model", lab.custom, "--qkv",
                                                     "layer:0", "--size", "1"],
    "validate --model": lambda lab: ["validate", "--model", lab.custom, "--gen-prompt", "hi", "--max-new-tokens", "1"],
    "transcoders train": lambda lab: ["transcoders", "train", "--model", lab.custom, "--steps", "1"],
    "transcoders collect": lambda lab: ["transcoders", "collect", "--model", lab.custom],
    "transcoders describe": lambda lab: ["transcoders", "describe", "--model", lab.custom],
    "transcoders explain": lambda lab: ["transcoders", "explain", "--model", lab.custom, "--prompt", "hi"],
    "generate --tokenizer": lambda lab: ["generate", "--model", lab.hf, "--tokenizer", lab.custom_tok, "--prompt",
                                         "hi", "--max-new-tokens", "1"],
    "generate --checkpoint": lambda lab: ["generate", "--checkpoint", lab.custom, "--prompt", "hi",
                                          "--max-new-tokens", "1"],
    "consensus --tokenizer": lambda lab: ["consensus", "--model", lab.ckpt, "--tokenizer", lab.custom_tok, "--prompt",
                                          "hi", "--size", "1"],
    "transcoders describe --explainer": lambda lab: ["transcoders", "describe", "--model", lab.ckpt, "--transcoders",
                                                     lab.set, "--explainer", lab.custom, "--max-features", "1",
                                                     "--store", lab.base / "no-store.sqlite"],
    "transcoders explain --explainer": lambda lab: ["transcoders", "explain", "--model", lab.ckpt, "--transcoders",
                                                    lab.set, "--explainer", lab.custom, "--prompt", "hi",
                                                    "--max-new-tokens", "1"],
}


@pytest.mark.parametrize("case", list(CUSTOM_CODE_CASES))
def test_a_folders_own_code_never_runs_unasked(lab, sandbox, case):
    argv = CUSTOM_CODE_CASES[case](lab)
    if argv[0] != "validate":
        argv += ["--device", "cpu"]
    line = contract(*call(argv))
    assert line is not None and "--trust-remote-code" in line, line
    assert not lab.sentinel.exists()


def test_the_server_never_runs_a_models_own_code(lab, sandbox):
    for extra in (["--model", lab.custom], ["--model", lab.hf, "--tokenizer", lab.custom_tok]):
        proc = subprocess.run([sys.executable, "-m", "core", "serve", *map(str, extra), "--device", "cpu", "--port",
                               "0"], cwd=sandbox, env=_env(lab), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert "--trust-remote-code" in contract(proc.returncode, proc.stdout, proc.stderr)
    assert not lab.sentinel.exists()


def _link_out(folder: Path, name: str, target: Path) -> Path:
    """Replace ``folder/name`` by a link to ``target`` (outside the folder); returns the link."""
    path = folder / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(target)
    return path


def _outside_copy(src: Path, tmp: Path) -> Path:
    """A real file of the right kind, moved out of its folder (what a link would point at)."""
    dest = tmp / f"outside-{src.name}"
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy(src, dest)
    return dest


MODEL_LINKS = ["README.md", "config.json", "tokenizer.json", "model.safetensors"]
RUN_LINKS = ["log.txt", "console.txt", "metrics.jsonl", "status.json", "config.json", "events.jsonl", "checkpoints"]
SET_LINKS = ["config.json", "layer_0.safetensors", "metrics.json", "features.sqlite"]


def _commands_reading(kind: str, folder: Path, lab, tmp: Path) -> list[list]:
    if kind == "model":
        runs = tmp / "runs-with-model"
        (runs / "r" / "checkpoints").mkdir(parents=True)
        (runs / "r" / "checkpoints" / "1").symlink_to(folder)  # a checkpoint folder may be a link; its files not
        return [["generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"],
                ["consensus", "--model", folder, "--prompt", "hi", "--size", "1", "--device", "cpu"],
                ["models", "--runs", runs], ["models", "--runs", runs, "--json"]]
    if kind == "run":
        return [["runs", "status", folder.name, "--root", folder.parent], ["runs", "status", folder, "--json"],
                ["runs", "list", "--root", folder.parent], ["runs", "resume", folder, "--max-steps", "3"],
                ["train", "--resume", folder, "--max-steps", "3", "--no-progress"],
                ["generate", "--train_folder", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"],
                ["models", "--runs", folder.parent]]
    base = ["--model", lab.ckpt, "--device", "cpu", "--transcoders", folder]
    return [["transcoders", "explain", *base, "--prompt", "hi", "--max-new-tokens", "1"],
            ["transcoders", "describe", *base, "--max-features", "2"],
            ["transcoders", "collect", *base, "--dataset", lab.text, "--collect-tokens", "128",
             "--collect-seq-len", "16"]]


LINK_CASES = ([("model", n) for n in MODEL_LINKS] + [("run", n) for n in RUN_LINKS] + [("set", n) for n in SET_LINKS])


@pytest.mark.parametrize("kind, name", LINK_CASES, ids=[f"{k}-{n}" for k, n in LINK_CASES])
def test_a_link_out_of_a_model_run_or_set_folder_is_never_followed(lab, sandbox, kind, name):
    src = {"model": lab.ckpt, "run": lab.run, "set": lab.set}[kind]
    root = sandbox / "runs" if kind == "run" else sandbox
    folder = root / src.name
    shutil.copytree(src, folder, symlinks=True)
    if kind == "run":
        (folder / "console.txt").write_text("console\n")
    if name == "README.md" or name.endswith((".txt", ".jsonl")) or name == "status.json":
        target = lab.secret  # what an attacker wants shown
    else:
        target = _outside_copy(folder / name, sandbox)  # the real file, moved out and linked back
    _link_out(folder, name, target)
    outside = digest(target, lab.secret)
    for argv in _commands_reading(kind, folder, lab, sandbox):
        rc, out, err = call(argv)
        contract(rc, out, err)
        assert "adversary-secret" not in out + err, argv
        if argv[:2] in (["runs", "resume"], ["train", "--resume"]) or (kind != "run" and argv[0] != "models"):
            assert rc == 2, (argv, out, err)  # a writer never goes on, a reader of the linked file refuses it
        if argv[:2] == ["runs", "status"]:
            assert "unreadable" in out and "outside the run folder" in out, out  # the run is shown broken, not read
        assert digest(target, lab.secret) == outside, f"{argv} changed the file behind the link"
    assert (folder / name).is_symlink()


# == 4. bytes, JSON and numbers that are not what a command expects ==================================

STDIN_BYTES = {
    "latin-1": b"ROMEO \xe9t\xe9\n", "lone continuation": b"ok line\n\x80\x81\n", "truncated utf-8": b"caf\xc3",
    "bom and ff": b"\xff\xfe\x00h\x00i", "nul bytes": b"\x00\x00\x00", "random": bytes(range(256)) * 2,
    "empty": b"", "only newlines": b"\n\r\n\r", "unicode separators": "a\u2028b\u0085c\n".encode(),
}
STDIN_READERS = {
    "generate": lambda lab: ["generate", *_model(lab), "--max-new-tokens", "1"],
    "consensus": lambda lab: ["consensus", *_model(lab), "--size", "1"],
    "transcoders explain": lambda lab: ["transcoders", "explain", *_model(lab), "--transcoders", lab.set,
                                        "--max-new-tokens", "1"],
}


@pytest.mark.parametrize("blob", list(STDIN_BYTES))
@pytest.mark.parametrize("reader", list(STDIN_READERS))
def test_any_bytes_on_stdin_are_a_prompt_or_a_sentence(lab, sandbox, reader, blob):
    line = contract(*call(STDIN_READERS[reader](lab), stdin=STDIN_BYTES[blob]))
    if line is not None:
        assert "UTF-8" in line or "empty" in line.lower() or "No prompt" in line, line


def test_a_real_process_fed_bytes_answers_in_one_sentence(lab, sandbox):
    for argv in STDIN_READERS.values():
        proc = subprocess.run([sys.executable, "-m", "core", *map(str, argv(lab))], input=b"bad \xff\xfe bytes\n",
                              cwd=sandbox, env=_env(lab), capture_output=True, timeout=120)
        line = contract(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
        assert line is not None and "not UTF-8" in line and "0xff" in line


HOSTILE_TEXTS = {
    "empty": "", "not json": "{\"model\": ", "null": "null", "a list": "[]", "a number": "1e999", "a string": '"x"',
    "nested 5000 deep": "[" * 5000 + "]" * 5000, "object nested 5000 deep": '{"a":' * 5000 + "1" + "}" * 5000,
    "not utf-8": "\udcff\udcfe{}",
}


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


# (which folder, which file, the commands that read it); each hostile text is written there in turn
JSON_READERS = {
    "checkpoint config.json": ("model", "config.json", lambda lab, f: [
        ["generate", "--model", f, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]]),
    "hf config.json": ("hf model", "config.json", lambda lab, f: [
        ["generate", "--model", f, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"],
        ["validate", "--model", f, "--gen-prompt", "hi", "--max-new-tokens", "1"]]),
    "tokenizer.json": ("model", "tokenizer.json", lambda lab, f: [
        ["generate", "--model", f, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]]),
    "train --config": ("file", "config.json", lambda lab, f: [
        ["train", "--config", f / "config.json", "--dataset", lab.text, *TINY_TRAIN, "--max-steps", "1",
         "--output-dir", f.parent / "out"]]),
    "run status.json": ("run", "status.json", lambda lab, f: [
        ["runs", "list", "--root", f.parent], ["runs", "status", f], ["runs", "resume", f], ["runs", "stop", f]]),
    "run config.json": ("run", "config.json", lambda lab, f: [
        ["runs", "list", "--root", f.parent], ["runs", "status", f], ["train", "--resume", f, "--no-progress"]]),
    "run marker": ("run", ".gptlab-job", lambda lab, f: [["runs", "list", "--root", f.parent], ["runs", "status", f]]),
    "run metrics.jsonl": ("run", "metrics.jsonl", lambda lab, f: [["runs", "status", f, "--json"]]),
    "run events.jsonl": ("run", "events.jsonl", lambda lab, f: [["runs", "list", "--root", f.parent, "--json"]]),
    "run checkpoint config.json": ("run", "checkpoints/2/config.json", lambda lab, f: [
        ["models", "--runs", f.parent], ["generate", "--train_folder", f, "--prompt", "hi", "--max-new-tokens", "1",
                                         "--device", "cpu"]]),
    "set config.json": ("set", "config.json", lambda lab, f: [
        ["transcoders", "explain", *_model(lab), "--transcoders", f, "--prompt", "hi", "--max-new-tokens", "1"]]),
    "set metrics.json": ("set", "metrics.json", lambda lab, f: [
        ["transcoders", "explain", *_model(lab), "--transcoders", f, "--prompt", "hi", "--max-new-tokens", "1"],
        ["transcoders", "collect", *_model(lab), "--transcoders", f, "--dataset", lab.text, "--collect-tokens", "128",
         "--collect-seq-len", "16"]]),
    "feature store": ("set", "features.sqlite", lambda lab, f: [
        ["transcoders", "describe", *_model(lab), "--transcoders", f, "--max-features", "1"],
        ["transcoders", "explain", *_model(lab), "--transcoders", f, "--prompt", "hi", "--max-new-tokens", "1",
         "--save"]]),
    "token cache meta.json": ("cache", "meta.json", lambda lab, f: [
        ["train", "--dataset", lab.text, *TINY_TRAIN, "--max-steps", "1", "--data-cache", f.parent.parent,
         "--output-dir", f.parent.parent.parent / "out"]]),
}


def _hostile_folder(lab, tmp: Path, kind: str) -> Path:
    if kind == "file":
        folder = tmp / "cfg"
        folder.mkdir()
        return folder
    if kind == "run":
        folder = tmp / "runs" / "r1"
        shutil.copytree(lab.run, folder)
        return folder
    if kind == "cache":
        cache = tmp / "cache"
        shutil.copytree(lab.cache, cache)
        return next((cache / "tokens").iterdir())  # one token cache entry; every entry gets the text below
    return _foreign(lab, tmp, {"model": "model", "hf model": "hf model", "set": "transcoder set"}[kind])


@pytest.mark.parametrize("text", list(HOSTILE_TEXTS))
@pytest.mark.parametrize("reader", list(JSON_READERS))
def test_hostile_json_in_every_file_a_command_reads_is_a_sentence(lab, sandbox, reader, text):
    kind, name, commands = JSON_READERS[reader]
    folder = _hostile_folder(lab, sandbox, kind)
    targets = list(folder.parent.glob(f"*/{name}")) if kind == "cache" else [folder / name]
    for argv in commands(lab, folder):
        for target in targets:
            _write(target, HOSTILE_TEXTS[text])
        contract(*call(argv))


HF_SIZES = [{"n_layer": 100_000}, {"n_embd": 10**6}, {"n_embd": 33}, {"n_head": 0}, {"vocab_size": -1},
            {"vocab_size": 10**12}, {"n_positions": 0}, {"n_layer": "12"}, {"n_layer": None}, {"n_layer": 1.5},
            {"n_layer": True}, {"layer_norm_epsilon": "nan"}, {"activation_function": "evil"}, {"model_type": 5},
            {"n_inner": -5}, {"eos_token_id": "x"}, {"attn_pdrop": 5}]
OUR_SIZES = [{"n_layer": 100_000}, {"vocab_size": 10**12}, {"d_model": "32"}, {"n_head": 2.5}, {"causal": "yes"},
             {"dropout": float("nan")}, {"mask_token_id": 10**9}, {"layer_norm_eps": 0}, {"block_size": -1}]


@pytest.mark.parametrize("change", HF_SIZES + OUR_SIZES, ids=[f"{'hf' if i < len(HF_SIZES) else 'ours'}-{c}"
                                                             for i, c in enumerate(HF_SIZES + OUR_SIZES)])
def test_a_config_of_absurd_sizes_is_refused_before_anything_is_built(lab, sandbox, change):
    """Class 4: 100,000 layers hung, a string size or dropout 5 was transformers' exception."""
    ours = change in OUR_SIZES and HF_SIZES.count(change) == 0
    folder = _foreign(lab, sandbox, "model" if ours else "hf model")
    cfg = json.loads((folder / "config.json").read_text())
    (cfg["model"] if ours else cfg).update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    line = contract(*call(["generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device",
                           "cpu"], seconds=30))
    assert line is not None and time.perf_counter() - t0 < 15


NUMERIC = {  # command -> (argv, flags taking a number)
    "generate": (lambda lab: ["generate", *_model(lab), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty",
                  "--num-beams", "--length-penalty", "--seed", "--alternatives", "--gen-length", "--diffusion-steps",
                  "--cuda", "--num_layers", "--block-length", "--gen-ppl-samples"]),
    "consensus": (lambda lab: ["consensus", *_model(lab), "--prompt", "hi", "--size", "1"],
                  ["--size", "--seed", "--record-every", "--memory-budget", "--use-model", "--top-p",
                   "--random-prompt"]),
    "consensus --simulate": (lambda lab: ["consensus", "--simulate", "--size", "2", "--tokens", "4", "--dim", "3",
                                          "--device", "cpu"],
                             ["--size", "--tokens", "--dim", "--dt", "--beta", "--inits", "--seed", "--record-every",
                              "--memory-budget"]),
    "validate": (lambda lab: ["validate", "--model", lab.hf, "--gen-prompt", "hi", "--max-new-tokens", "1"],
                 ["--max-new-tokens"]),
    "train": (lambda lab: ["train", "--dataset", lab.text, *TINY_TRAIN, "--max-steps", "1"],
              ["--vocab-size", "--val-fraction", "--max-data-tokens", "--n-layer", "--n-head", "--d-model",
               "--block-size", "--dropout", "--lr", "--min-lr-ratio", "--weight-decay", "--beta1", "--beta2",
               "--grad-clip", "--warmup-steps", "--batch-size", "--grad-acc-steps", "--max-steps", "--epochs", "--seed",
               "--val-every", "--val-batches", "--preview-every", "--preview-tokens", "--save-every", "--keep-last",
               "--log-every", "--cuda"]),
    "runs": (lambda lab: ["runs", "status", "r1"], ["--log", "--wait", "--max-steps"]),
    "serve": (lambda lab: ["serve", "--model", lab.base / "no-such-model", "--device", "cpu"],
              ["--port", "--max-queue", "--queue-timeout", "--cuda"]),
    "transcoders train": (lambda lab: ["transcoders", "train", *_model(lab), "--steps", "2", "--batch-tokens", "32",
                                       "--seq-len", "16", "--dataset", lab.text, "--no-collect", "--expansion", "1",
                                       "--k", "2"],
                          ["--expansion", "--k", "--l1-coeff", "--train-tokens", "--steps", "--batch-tokens",
                           "--grad_acc_steps", "--lr", "--seq-len", "--eval-every", "--save-every", "--seed",
                           "--collect-tokens", "--top-k", "--n-quantile", "--layers"]),
    "transcoders collect": (lambda lab: ["transcoders", "collect", *_model(lab), "--transcoders", lab.set,
                                         "--collect-tokens", "256", "--collect-seq-len", "16", "--dataset", lab.text],
                            ["--collect-tokens", "--collect-seq-len", "--top-k", "--n-quantile", "--n-heldout",
                             "--n-negative", "--collect-batch", "--seed", "--train_steps", "--layers", "--window"]),
    "transcoders describe": (lambda lab: ["transcoders", "describe", *_model(lab), "--transcoders", lab.set],
                             ["--batch-size", "--max-features", "--n-top", "--n-sim", "--layers"]),
    "transcoders explain": (lambda lab: ["transcoders", "explain", *_model(lab), "--transcoders", lab.set, "--prompt",
                                         "hi", "--max-new-tokens", "1"],
                            ["--max-new-tokens", "--temperature", "--top-p", "--seed", "--steps", "--top-features"]),
}
NUMERIC_CASES = [(c, f) for c, (_, flags) in NUMERIC.items() for f in flags]


@pytest.mark.parametrize("command, flag", NUMERIC_CASES, ids=[f"{c} {f}" for c, f in NUMERIC_CASES])
def test_absurd_numbers_on_every_numeric_flag(lab, sandbox, command, flag):
    """0, -1, 1e30, nan, inf and 10**20 on every numeric flag: a result or one sentence, in seconds."""
    build, _ = NUMERIC[command]
    for value in ABSURD:
        argv = [str(a) for a in build(lab)]
        # the set and the store are written by some of these commands: on copies of the case's own
        argv = [str(sandbox / "set") if a == str(lab.set) else a for a in argv]
        if not (sandbox / "set").exists():
            shutil.copytree(lab.set, sandbox / "set")
        values = [value, value] if flag == "--window" else [value]
        if flag in argv:
            i = argv.index(flag)
            argv[i + 1:i + 1 + len(values)] = values
        else:
            argv += [f"{flag}={values[0]}", *values[1:]]  # --flag=-1: argparse would take -1 for a flag
        if command in ("train", "transcoders train") and "--output-dir" not in argv:
            argv += ["--output-dir", str(sandbox / f"out-{ABSURD.index(value)}")]
        if command == "runs":  # on a copy of the run: a resume that starts really trains it
            if not (sandbox / "runs").exists():
                shutil.copytree(lab.runs, sandbox / "runs")
            argv += ["--root", str(sandbox / "runs")]
            argv[1] = {"--max-steps": "resume", "--wait": "stop"}.get(flag, argv[1])
        contract(*call(argv, seconds=45))


# == 5. silent nonsense ===============================================================================

def _string_flags() -> list[tuple[tuple[str, ...], str]]:
    """(command path, flag) for every option of every command that takes text: found in the parser,
    so a flag added later is tried too."""
    import argparse

    found = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
            elif action.option_strings and action.nargs != 0 and action.choices is None and \
                    action.type in (None, cli.path_arg) and not isinstance(action, argparse._HelpAction):
                found.append((path, action.option_strings[0]))
    walk(build_parser(), ())
    return found


STRING_FLAGS = _string_flags()
# flags a command cannot go without, given first so the empty value under test (given after, so it
# wins when it is the same flag) is what the command judges
REQUIRED = {("export",): ["--to", "out-x"], ("transcoders", "export"): ["--to", "out-x"],
            ("transcoders", "import"): ["--from", "in-x"]}


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
@pytest.mark.parametrize("path, flag", STRING_FLAGS, ids=[f"{' '.join(p)} {f}" for p, f in STRING_FLAGS])
def test_an_empty_value_is_never_taken_for_the_default(sandbox, path, flag, value):
    """`--store ''` meant the set's own store, `--api-key ''` a server with no key, `--json ''` a file
    called .json: an empty value is refused, naming the flag, before anything runs."""
    before = digest(sandbox)
    line = contract(*call([*path, *REQUIRED.get(path, []), flag, value]))
    assert line is not None and (flag in line or "empty" in line.lower()), line
    assert changed(before, digest(sandbox)) == []


def test_a_diverging_simulation_says_so_and_keeps_what_it_computed(sandbox):
    out = sandbox / "sim"
    line = contract(*call(["consensus", "--simulate", "--size", "3", "--tokens", "4", "--dim", "3", "--dt", "1e30",
                           "--device", "cpu", "--savefile", out]))
    assert line is not None and "NaN or infinity" in line
    metric = np.load(sandbox / "sim.npy")
    assert np.isfinite(metric[:, 0]).all()  # the steps before the blow-up are kept, and nothing after is made up


def test_transcoders_that_diverge_are_never_saved_as_nan(lab, sandbox):
    out = sandbox / "set"
    line = contract(*call(["transcoders", "train", *_model(lab), "--dataset", lab.text, "--steps", "3",
                           "--batch-tokens", "32", "--seq-len", "16", "--expansion", "1", "--k", "2", "--lr", "1e30",
                           "--activation", "relu", "--output-dir", out]))
    if line is None:
        from core.interp.transcoder import load_transcoder_set
        import torch

        tset = load_transcoder_set(out)
        assert all(torch.isfinite(p).all() for t in tset.transcoders.values() for p in t.parameters())
    else:
        assert not (out / "layer_0.safetensors").exists()


def test_a_diffusion_checkpoint_without_a_mask_token_is_refused(lab, sandbox):
    folder = _foreign(lab, sandbox, "model")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["objective"] = "diffusion"
    cfg["model"]["mask_token_id"] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    # neither its config nor this tokenizer (GPT-2's kind, no [MASK]) names a mask token
    line = contract(*call(["generate", "--model", folder, "--tokenizer", lab.hf, "--prompt", "hi", "--device", "cpu"]))
    assert line is not None and "mask token" in line


# == 6. memory over budget ===========================================================================

@pytest.mark.parametrize("argv, stdin", [
    (["consensus", "--size", "1"], "\n".join(f"prompt {i}" for i in range(100_000)).encode()),
    (["consensus", "--prompt", "hi", "--size", "1000000000"], b""),
    (["consensus", "--prompt", "hi", "--size", "1000000000", "--record-every", "1000000000", "--memory-budget",
      "0.000001"], b""),
    (["consensus", "--prompt", "hi", "--memory-budget", "1e300"], b""),
    (["consensus", "--randomprompt", "100000", "100000", "--size", "1"], b""),
    (["consensus", "--random-prompt", "60", "--size", "100000", "--matrixerror", "m.npy"], b""),
    (["consensus", "--simulate", "--tokens", "100000", "--dim", "100000", "--size", "1"], b""),
    (["consensus", "--simulate", "--inits", "100000000", "--size", "1"], b""),
    (["generate", "--prompt", "hi", "--max-new-tokens", "1000000000"], b""),
    (["generate", "--prompt", "hi", "--num-beams", "1000000", "--max-new-tokens", "2"], b""),
], ids=["100k prompts on stdin", "size 1e9", "size 1e9 record-every 1e9 in 1 KB", "budget 1e300", "randomprompt 1e5 x 1e5",
        "matrices of 1e5 iterations", "simulate 1e5 tokens in 1e5 dims", "simulate 1e8 inits", "1e9 new tokens",
        "a million beams"])
def test_work_too_big_for_the_machine_is_refused_or_bounded(lab, sandbox, argv, stdin):
    model = [] if "--simulate" in argv else ["--model", lab.ckpt]
    t0 = time.perf_counter()
    contract(*call([*argv, *model, "--device", "cpu"], stdin=stdin, seconds=90))
    assert time.perf_counter() - t0 < 90


# == 7. leftovers =====================================================================================

def test_what_killed_builds_and_broken_runs_leave_never_hides_or_piles_up(lab, sandbox):
    from core.jobs.process import this_host

    root = sandbox / "runs"
    shutil.copytree(lab.runs, root)
    (root / "broken").mkdir()
    (root / "broken" / ".gptlab-job").write_text(json.dumps({"kind": "training-run"}))
    (root / "broken" / "status.json").write_text("{not json")
    (root / "linked").symlink_to(root / "r1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = sandbox / "cache"
    shutil.copytree(lab.cache, cache)
    stale = cache / "tokens" / f".{'f' * 16}.tmp-{this_host()}-{dead.pid}"
    stale.mkdir()
    (stale / "train_0000.bin").write_bytes(b"\0" * 64)
    rc, out, err = call(["runs", "list", "--root", root])
    contract(rc, out, err)
    assert all(name in out for name in ("r1", "broken", "linked")) and out.count("unreadable") == 2
    contract(*call(["runs", "delete", "linked", "--root", root]))
    assert (root / "r1" / "checkpoints" / "2").is_dir()  # a link's target is never deleted through it
    fresh = sandbox / "fresh.txt"  # a corpus not cached yet: its build sweeps what killed builds left
    fresh.write_text(CORPUS[::-1] * 3)
    assert contract(*call(["train", "--dataset", fresh, *TINY_TRAIN, "--max-steps", "1", "--data-cache", cache,
                           "--output-dir", sandbox / "out"])) is None
    assert not stale.exists()


# == serve: its arguments, before anything listens =====================================================

@pytest.mark.parametrize("extra", [
    ["--api-key", ""], ["--host", " "], ["--served-model-name", ""], ["--port", "70000"], ["--port", "-1"],
    ["--max-queue", "nan"], ["--queue-timeout", "inf"], ["--queue-timeout", "0"], ["--model", ""],
    ["--model", "n" * 300], ["--tokenizer", "a-fifo"], ["--host", "999.1.1.1"], ["--log-level", "loud"],
], ids=lambda e: " ".join(e)[:40])
def test_the_servers_bad_arguments_are_one_sentence_before_it_listens(lab, sandbox, extra):
    os.mkfifo(sandbox / "a-fifo")
    model = [] if "--model" in extra else ["--model", lab.ckpt]
    line = contract(*call(["serve", *model, "--device", "cpu", "--port", "0", *extra], seconds=60))
    assert line is not None


# == focused tests of the mechanisms the fixes share =====================================================

def _path_flags() -> list[tuple[tuple[str, ...], str]]:
    import argparse

    found = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
            elif action.type is cli.path_arg:
                found.append((path, action.option_strings[0] if action.option_strings else action.metavar))
    walk(build_parser(), ())
    return found


PATH_FLAGS = _path_flags()


@pytest.mark.parametrize("path, flag", PATH_FLAGS, ids=[f"{' '.join(p)} {f}" for p, f in PATH_FLAGS])
def test_a_name_no_file_system_takes_is_refused_while_parsing(sandbox, path, flag):
    """cli.path_arg: every flag naming a file, folder or model; was an OSError wherever it was first used."""
    argv = [*path, flag, "n" * 300] if flag.startswith("-") else [*path, "status", "n" * 300]
    line = contract(*call(argv))
    assert line is not None and "longer than the" in line and "bytes the file system allows" in line, line


def test_parse_json_takes_nesting_too_deep_for_a_malformed_file():
    from core.files import parse_json

    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)
    assert parse_json('{"a": [1, 2]}') == {"a": [1, 2]}


def test_check_output_dir_judges_the_place_and_writes_nothing(tmp_path):
    from core.errors import LabError
    from core.files import check_output_place

    file = tmp_path / "f.txt"
    file.write_text("x")
    assert check_output_place(tmp_path / "new" / "deeper", "--x") == tmp_path / "new" / "deeper"
    assert check_output_place(tmp_path, "--x") == tmp_path
    for bad, words in [(file, "is a file"), (file / "sub", "is a file, not a folder"), ("", "empty"),
                       (tmp_path / ("n" * 300), "longer than")]:
        with pytest.raises(LabError, match=words):
            check_output_place(bad, "--x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_run_records_absolute_paths_so_it_resumes_from_anywhere(lab, sandbox):
    """`runs resume` starts the run in another folder: a relative --dataset named nothing there."""
    shutil.copy(lab.text, sandbox / "corpus.txt")
    out = sandbox / "run"
    assert contract(*call(["train", "--dataset", "corpus.txt", *TINY_TRAIN, "--max-steps", "1", "--output-dir",
                           "run", "--data-cache", "cache"])) is None
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == str(sandbox / "corpus.txt") and cfg["data_cache"] == str(sandbox / "cache")


def test_a_damaged_token_cache_is_built_again(lab, sandbox):
    cache = sandbox / "cache"
    shutil.copytree(lab.cache, cache)
    for meta in cache.glob("tokens/*/meta.json"):
        meta.write_text(json.dumps({"dtype": "object"}))
    assert contract(*call(["train", "--dataset", lab.text, *TINY_TRAIN, "--max-steps", "1", "--data-cache", cache,
                           "--output-dir", sandbox / "run"])) is None
    assert any(json.loads(m.read_text()).get("dtype") in ("uint16", "uint32") for m in cache.glob("tokens/*/meta.json"))
    assert "damaged" in (sandbox / "run" / "log.txt").read_text()


def test_an_unreadable_folder_inside_a_dataset_is_one_sentence(lab, sandbox, monkeypatch):
    folder = sandbox / "corpus"
    folder.mkdir()
    shutil.copy(lab.text, folder / "a.txt")

    def denied(self, pattern):
        raise PermissionError(13, "Permission denied", str(folder / "locked"))

    monkeypatch.setattr(Path, "rglob", denied)
    line = contract(*call(["train", "--dataset", folder, *TINY_TRAIN, "--max-steps", "1", "--output-dir",
                           sandbox / "run"]))
    assert line is not None and "Cannot read" in line and "locked" in line


def test_an_output_folder_is_judged_again_under_the_runs_lock(lab, sandbox):
    """A second `train` that passed the first look while the first was starting finds that run there."""
    from core.errors import LabError
    from core.training import runs

    folder = sandbox / "run"
    folder.mkdir()
    (folder / ".writer.lock").write_text("")  # our own lock, and a marker being written: hidden, not content
    (folder / ".gptlab-job.tmp").write_text("")
    runs.check_output_folder(folder)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(LabError, match="already holds a training run"):
        runs.check_output_folder(folder)
    (folder / "metrics.jsonl").unlink()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(LabError, match="is not empty"):
        runs.check_output_folder(folder)
