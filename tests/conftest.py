"""Shared fixtures: tiny random GPT-2 / GPT-Neo folders saved with save_pretrained plus a small
tokenizer trained here, so every test runs offline in seconds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread beats two that wait on each other

CORPUS = ("Once upon a time there was a little model that learned to speak. "
          "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
          "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:") * 20


CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_runs_root(tmp_path_factory) -> Path:
    """Every run, job and upload the suite makes goes under a temporary runs root, never into the
    checkout's gitignored ``runs/``: ``$GPTLAB_RUNS`` is set for the whole session (so session- and
    module-scoped fixtures and every subprocess see it too). A test that needs its own root sets it
    with ``monkeypatch.setenv`` (or ``delenv`` with a ``chdir``), which is undone after that test."""
    root = tmp_path_factory.mktemp("session-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTLAB_RUNS", str(root))
        yield root


def _hf_tokenizer(folder: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def _tiny_hf_dir(tmp_path_factory, name: str, build) -> Path:
    """A Hugging Face model folder: the small tokenizer trained here, and ``build(tokenizer)``'s
    model (seeded, in eval mode) saved beside it."""
    folder = tmp_path_factory.mktemp(name)
    tok = _hf_tokenizer(folder)
    torch.manual_seed(0)
    build(tok).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    return _tiny_hf_dir(tmp_path_factory, "tiny-gpt2", lambda tok: GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id)))


@pytest.fixture(scope="session")
def tiny_neo_dir(tmp_path_factory) -> Path:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    # window 8 < context 64 so the local layers' sliding window is exercised
    return _tiny_hf_dir(tmp_path_factory, "tiny-neo", lambda tok: GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=len(tok), max_position_embeddings=64, hidden_size=32, num_layers=4, num_heads=4,
        attention_types=[[["global", "local"], 2]], window_size=8, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id)))


def _tiny_gptlab_dir(folder: Path, objective: str = "ar") -> Path:
    """Our own checkpoint format with real (random) weights and a BPE tokenizer trained here:
    2 layers, width 32, context 64; a diffusion model is bidirectional, knows its mask token and has
    rotary positions, as the trainer makes it."""
    from core.models.gpt import GPT, GPTConfig
    from core.models.loading import save_checkpoint
    from core.models.tokenizer import train_bpe

    tok = train_bpe([CORPUS], 320, folder / "tokenizer.json")
    diffusion = objective == "diffusion"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32,
                          causal=not diffusion, mask_token_id=tok.mask_id if diffusion else None,
                          positions="rotary" if diffusion else "learned"))
    save_checkpoint(folder, model, str(folder / "tokenizer.json"), objective=objective)
    return folder


@pytest.fixture(scope="session")
def tiny_gptlab_dir(tmp_path_factory) -> Path:
    """A tiny autoregressive GPT Lab checkpoint (see ``_tiny_gptlab_dir``)."""
    return _tiny_gptlab_dir(tmp_path_factory.mktemp("tiny-gptlab"))


@pytest.fixture(scope="session")
def tiny_diffusion_dir(tmp_path_factory) -> Path:
    """A tiny masked-diffusion GPT Lab checkpoint (see ``_tiny_gptlab_dir``)."""
    return _tiny_gptlab_dir(tmp_path_factory.mktemp("tiny-diffusion"), objective="diffusion")


@pytest.fixture(scope="module")
def tiny_diffusion_lm(tiny_diffusion_dir):
    """The tiny diffusion checkpoint loaded, once per test module."""
    from core.models.loading import load_model

    lm = load_model(str(tiny_diffusion_dir))
    assert lm.objective == "diffusion"
    return lm


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A tiny training text (the corpus three times), shared by a test module's runs."""
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(CORPUS * 3)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A token cache folder for a test module's runs (the text is tokenised once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def own_code_model(tmp_path: Path) -> tuple[Path, Path]:
    """(a model folder whose config names its own Python code, the file that code writes if it
    ever runs): loading it without trusting remote code must refuse and leave no such file."""
    folder, marker = tmp_path / "own-code-model", tmp_path / "code-ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gptlab_custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (folder / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def wait_for(predicate, timeout: float = 240.0, every: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned); generous timeouts because
    CI machines are slow and a real process is on the other side."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


@pytest.fixture
def downloads(monkeypatch) -> dict[str, bytes]:
    """Every download button's file, by file name, as a page handed it to Streamlit (AppTest cannot
    click a download, so the files are caught on their way into Streamlit's media storage; a
    deferred download's callable is called, as a click would)."""
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id
    original_deferred = MediaFileManager.add_deferred

    def as_bytes(data) -> bytes:
        return data if isinstance(data, bytes) else str(data).encode()

    def spy(self, path_or_data, mimetype, kind, filename=None):
        if filename:
            files[filename] = as_bytes(path_or_data)
        return original(self, path_or_data, mimetype, kind, filename)

    def spy_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        if file_name:
            files[file_name] = as_bytes(data_callable())
        return original_deferred(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", spy)
    monkeypatch.setattr(MediaFileManager, "add_deferred", spy_deferred)
    return files


def process_cmdline(pid: int) -> str:
    """The command line of a live process ("" when it is gone or unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def leftover_pids(statuses, known) -> dict[int, None]:
    """Processes named by these status.json files that this test process did not start itself
    (``known``) and that are still the job of that folder (its path is on their command line, so
    a pid the system has since given to something else is left alone)."""
    found: dict[int, None] = {}
    for status in statuses:
        try:
            pid = int(json.loads(Path(status).read_text()).get("pid") or 0)
        except (OSError, ValueError):
            continue
        if pid and pid not in known and str(Path(status).parent) in process_cmdline(pid):
            found[pid] = None
    return found


def kill_process_groups(procs: dict[int, subprocess.Popen | None]) -> None:
    """End the runs and jobs a test started (each leads its own session, so its group is all of
    it) and reap those this process started, so no test leaves a process behind."""
    for pid, proc in procs.items():
        if proc is None or proc.poll() is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc is not None:
            proc.wait(timeout=30)


@pytest.fixture
def runs_root(tmp_path: Path, cache: Path, monkeypatch) -> Path:
    """Runs (and uploads) under tmp_path, tokens in the module's cache; any training process
    started during the test is killed afterwards."""
    from core.training import runs as runs_mod

    root = tmp_path / "runs"
    monkeypatch.setenv("GPTLAB_RUNS", str(root))
    monkeypatch.setenv("GPTLAB_DATA_CACHE", str(cache))
    before = set(runs_mod._CHILDREN)
    yield root
    ours = {pid: proc for pid, proc in runs_mod._CHILDREN.items() if pid not in before}
    kill_process_groups({**ours, **leftover_pids(root.glob("*/status.json"), ours)})
    for pid in ours:
        runs_mod._CHILDREN.pop(pid, None)
