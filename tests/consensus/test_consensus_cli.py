"""`python -m core consensus`: every file layout and shape, run in-process through core.commands.cli.main."""
import io
import sys

import numpy as np
import pytest

from core.commands.cli import main
from core.consensus.engine import ConsensusConfig, run_consensus
from core.models.loading import load_model

A = "ROMEO: But soft, what light through yonder window breaks?"
B = "The quick brown fox"


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


def run(args, capsys):
    code = main(["consensus", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_savefile_eplot_matrixerror_layouts(tiny_gpt2_dir, lm, tmp_path, capsys):
    N, L = 3, lm.stack.n_layer
    code, out, _ = run(["--model", str(tiny_gpt2_dir), "--prompt", A, "--prompt", B, "--size", str(N),
                        "--savefile", str(tmp_path / "run"), "--eplot", str(tmp_path / "ep"),
                        "--matrixerror", str(tmp_path / "mx.npy")], capsys)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep.npy", "mx.npy", "run.npy", "run_hidden.npy"]
    ta, tb = len(lm.tokenizer.encode(A)), len(lm.tokenizer.encode(B))
    metric = np.load(tmp_path / "run.npy", allow_pickle=False)
    hidden = np.load(tmp_path / "run_hidden.npy", allow_pickle=False)
    eplot = np.load(tmp_path / "ep.npy", allow_pickle=False)
    mx = np.load(tmp_path / "mx.npy", allow_pickle=False)
    assert metric.dtype == hidden.dtype == eplot.dtype == mx.dtype == np.float32
    assert metric.shape == (2, N * L + 1)
    assert hidden.shape == (2, ta, lm.stack.d_model)
    assert eplot.shape == (2, N * L, 2)
    assert mx.shape == (2, ta, ta, N * L)
    # the files hold the engine's numbers
    ref = run_consensus(lm, [A, B], ConsensusConfig(iterations=N, matrix=True))
    np.testing.assert_array_equal(metric, ref.metric)
    np.testing.assert_array_equal(eplot[..., 0], ref.mean_cosine[:, 1:])
    np.testing.assert_array_equal(eplot[..., 1], ref.mean_dot[:, 1:])
    np.testing.assert_array_equal(mx, ref.matrix[..., 1:])
    # the shorter prompt is NaN-padded on its token axes, nothing else is
    assert np.isnan(hidden[1, tb:]).all() and not np.isnan(hidden[1, :tb]).any() and not np.isnan(hidden[0]).any()
    assert np.isnan(mx[1, tb:]).all() and np.isnan(mx[1, :, tb:]).all() and not np.isnan(mx[1, :tb, :tb]).any()
    # one summary line per prompt, in order
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"prompt 1 ({ta} tokens)") and B in lines[1]


def test_summary_line_reads_a_collapsed_cloud_as_rank_one(tiny_gpt2_dir, lm, capsys, monkeypatch):
    """The summary prints the effective rank and the centroid distance, first and last; a cloud
    collapsed to one point up to float32 rounding noise reads rank 1.00, not its noise's 2-5."""
    code, out, _ = run(["--model", str(tiny_gpt2_dir), "--prompt", A, "--size", "2"], capsys)
    ref = run_consensus(lm, [A], ConsensusConfig(iterations=2))
    er, cd = ref.effective_rank[0], ref.centroid_distance[0]
    assert code == 0 and (f"effective rank {er[0]:.2f} -> {er[-1]:.2f}, centroid distance {cd[0]:.3g} -> "
                          f"{cd[-1]:.3g} after {2 * lm.stack.n_layer} layer-steps") in out

    import torch

    import core.consensus.engine as engine

    gen = torch.Generator().manual_seed(0)

    def collapse(lm_, layer, h, skip_mlp):  # every token moved onto the cloud's mean, plus float32 noise
        point = h.mean(1, keepdim=True).expand_as(h)
        scale = 1e-7 * point.norm(dim=-1, keepdim=True) / h.shape[-1] ** 0.5  # relative spread 1e-7
        return point + torch.randn(h.shape, generator=gen) * scale

    monkeypatch.setattr(engine, "_block", collapse)
    code, out, _ = run(["--model", str(tiny_gpt2_dir), "--prompt", A, "--size", "1"], capsys)
    assert code == 0 and " -> 1.00, centroid distance " in out


def test_writes_nothing_unless_asked(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["--model", str(tiny_gpt2_dir), "--prompt", B, "--size", "2"], capsys)
    assert code == 0 and list(tmp_path.iterdir()) == []
    assert out.count("\n") == 1


def test_stdin_prompts_one_per_line(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{A}\n\n{B}\n"))
    code, out, _ = run(["--model", str(tiny_gpt2_dir), "--size", "2", "--savefile", str(tmp_path / "s")], capsys)
    assert code == 0
    assert np.load(tmp_path / "s.npy").shape[0] == 2  # the blank line is skipped
    assert A[:20] in out and B in out


def test_random_prompts_and_record_every(tiny_gpt2_dir, lm, tmp_path, capsys):
    code, _, _ = run(["--model", str(tiny_gpt2_dir), "--randomprompt", "3", "5", "--size", "4", "--record-every", "5",
                      "--savefile", str(tmp_path / "r"), "--eplot", str(tmp_path / "e")], capsys)
    assert code == 0
    steps = [0, 5, 10, 12]  # N*L = 12
    assert np.load(tmp_path / "r.npy").shape == (3, len(steps))
    assert np.load(tmp_path / "r_hidden.npy").shape == (3, 5, lm.stack.d_model)
    assert np.load(tmp_path / "e.npy").shape == (3, len(steps) - 1, 2)
    code, _, _ = run(["--model", str(tiny_gpt2_dir), "--random-prompt", "6", "--size", "1",
                      "--savefile", str(tmp_path / "one")], capsys)
    assert code == 0 and np.load(tmp_path / "one_hidden.npy").shape == (1, 6, lm.stack.d_model)


def test_use_model_files(tiny_gpt2_dir, lm, tmp_path, capsys):
    K, N = 3, 2
    code, out, _ = run(["--model", str(tiny_gpt2_dir), "--prompt", A, "--prompt", B, "--size", str(N),
                        "--use-model", str(K), "--top-p", "0.9", "--savefile", str(tmp_path / "g")], capsys)
    assert code == 0
    texts = np.load(tmp_path / "g.npy", allow_pickle=False)
    diag = np.load(tmp_path / "g_diag.npy", allow_pickle=False)
    assert texts.dtype.kind == "U" and texts.shape == (2,)
    assert texts[0].startswith(A) and texts[1].startswith(B)
    assert diag.shape == (K * 2, N * lm.stack.n_layer + 1) and diag.dtype == np.float32
    assert not np.isnan(diag).any()
    assert len(out.strip().splitlines()) == 2
    # same seed, same texts
    run(["--model", str(tiny_gpt2_dir), "--prompt", A, "--prompt", B, "--size", str(N), "--use-model", str(K),
         "--top-p", "0.9", "--savefile", str(tmp_path / "g2")], capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "g2.npy"), texts)
    np.testing.assert_array_equal(np.load(tmp_path / "g2_diag.npy"), diag)


def test_decode_prints_the_logit_lens(tiny_gpt2_dir, capsys):
    code, out, _ = run(["--model", str(tiny_gpt2_dir), "--prompt", B, "--size", "3", "--decode", "0,2"], capsys)
    assert code == 0
    assert "prompt 1, iteration 0: > " in out and "prompt 1, iteration 2: > " in out


@pytest.mark.parametrize("flag", ["--randominit", "--random-init", "--fullrandom", "--const-reset"])
def test_reinit_flags_are_seeded(tiny_gpt2_dir, tmp_path, capsys, flag):
    files = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, _, _ = run(["--model", str(tiny_gpt2_dir), "--prompt", B, "--size", "2", flag, "--seed", seed,
                          "--savefile", str(tmp_path / name)], capsys)
        assert code == 0
        files.append(np.load(tmp_path / f"{name}.npy"))
    np.testing.assert_array_equal(files[0], files[1])
    assert not np.allclose(files[0], files[2])


@pytest.mark.parametrize("args,match", [
    (["--prompt", "hi", "--size", "0"], "at least 1"),
    (["--prompt", ""], "Prompt 1 is empty"),
    (["--prompt", "the quick brown fox " * 40, "--size", "1"], "beyond the model's context of 64"),
    (["--prompt", "hi", "--decode", "0,x"], "comma-separated"),
    (["--prompt", "hi", "--size", "2", "--decode", "5"], r"outside 0\.\.1"),
    (["--prompt", "hi", "--randomprompt", "2", "3"], "not both"),
    (["--prompt", "hi", "--use-model", "2", "--eplot", "x"], "--use-model"),
    (["--prompt", A, "--size", "500", "--matrixerror", "m", "--memory-budget", "0.0005"], "--record-every"),
    (["--prompt", "hi", "--randominit", "--fullrandom"], "not allowed with"),
])
def test_errors_exit_2_with_one_line(tiny_gpt2_dir, tmp_path, capsys, monkeypatch, args, match):
    import re

    monkeypatch.chdir(tmp_path)
    code, out, err = run(["--model", str(tiny_gpt2_dir), *args], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(match, last), err
    assert list(tmp_path.iterdir()) == []


def test_nneo_conflicts_with_another_model(capsys):
    code, _, err = run(["--nneo", "--model", "gpt2", "--prompt", "hi"], capsys)
    assert code == 2 and "--nneo means --model gpt2-xl" in err


def test_no_prompts_on_stdin(tiny_gpt2_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n\n"))
    code, _, err = run(["--model", str(tiny_gpt2_dir), "--size", "1"], capsys)
    assert code == 2 and "No prompts" in err
