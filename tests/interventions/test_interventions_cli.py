"""--ablate / --steer / --steer-vector: the specs, the generate and consensus commands, and consensus runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.commands.cli import main
from core.consensus.engine import ConsensusConfig, run_consensus
from core.errors import LabError
from core.generation.config import SamplingConfig
from core.interventions import Interventions, from_flags, generate_with, parse_specs
from core.interventions.spec import Ablation, Steer, parse_ablation, parse_steer, parse_steer_vector
from core.models.loading import load_model

A = "ROMEO: But soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


def test_specs_read_and_write_back():
    assert parse_ablation("head:3.5") == Ablation("head", 3, 5, "zero")
    assert parse_ablation(" MLP:2:mean ") == Ablation("mlp", 2, None, "mean")
    assert parse_ablation("feature:1.42") == Ablation("feature", 1, 42)
    assert parse_steer("1.42=-8.5") == Steer(1, 42, -8.5)
    assert parse_steer("0.3=1e-2").scale == 0.01
    v = parse_steer_vector("dir/a@b.npy@blocks.1.hook_resid_post")
    assert (v.path, v.hook) == ("dir/a@b.npy", "blocks.1.hook_resid_post")
    iv = from_flags(["head:0.1", "layer:2:mean", "feature:1.3"], ["1.2=4"], ["x.npy@hook_embed"])
    assert parse_specs(iv.specs()) == iv
    assert iv.needs_transcoders and iv.needs_prompt_means and bool(iv) and not Interventions()
    assert [r["spec"] for r in iv.records()] == ["head:0.1", "layer:2:mean", "feature:1.3", "1.2=4", "x.npy@hook_embed"]


@pytest.mark.parametrize("bad, words", [("head:1", "head:L.H"), ("mlp:1.2", "mlp:L"), ("neuron:1", "Cannot read"),
                                        ("head:a.b", "Cannot read"), ("mlp:1:median", "Cannot read")])
def test_bad_ablation_specs_say_how_to_write_them(bad, words):
    with pytest.raises(LabError, match=words):
        parse_ablation(bad)


def test_bad_steer_specs_and_out_of_range_layers(lm):
    for bad in ("1=3", "1.2", "a.b=1", "1.2=x"):
        with pytest.raises(LabError, match="L.F=SCALE"):
            parse_steer(bad)
    with pytest.raises(LabError, match="FILE.npy@HOOK"):
        parse_steer_vector("nohook.npy")
    with pytest.raises(LabError, match="layers 0..2"):
        generate_with(lm, A, SamplingConfig(greedy=True, max_new_tokens=2), from_flags(["mlp:7"]))
    with pytest.raises(LabError, match="transcoder set"):
        generate_with(lm, A, SamplingConfig(greedy=True, max_new_tokens=2), from_flags(["feature:0.1"]),
                      transcoders="/nonexistent/set")


def test_consensus_with_every_mlp_ablated_equals_noff(lm):
    """--noff skips every MLP; mlp:L for every L zeroes each one: the same walk."""
    every = tuple(f"mlp:{i}" for i in range(lm.stack.n_layer))
    a = run_consensus(lm, [A], ConsensusConfig(iterations=3, skip_mlp=True))
    b = run_consensus(lm, [A], ConsensusConfig(iterations=3, interventions=every))
    np.testing.assert_allclose(b.metric, a.metric, atol=1e-6)
    np.testing.assert_allclose(b.hidden, a.hidden, atol=1e-5)
    one = run_consensus(lm, [A], ConsensusConfig(iterations=3, interventions=("mlp:1",)))
    assert not np.allclose(one.metric, a.metric, atol=1e-4)
    assert one.config.interventions == ("mlp:1",)                      # the run records what it changed


def test_consensus_head_ablation_matches_a_hooked_walk(lm):
    from core.interventions import hooks, prepare
    ids = lm.tokenizer.encode(A)
    cfg = ConsensusConfig(iterations=2, interventions=("head:1.0",))
    res = run_consensus(lm, [A], cfg)
    with hooks(lm, prepare(lm, from_flags(["head:1.0"]), [ids])):
        ref = run_consensus(lm, [A], ConsensusConfig(iterations=2))
    np.testing.assert_array_equal(res.metric, ref.metric)
    assert not np.allclose(res.metric, run_consensus(lm, [A], ConsensusConfig(iterations=2)).metric)


def test_bad_intervention_in_a_consensus_config_is_refused_before_running():
    with pytest.raises(LabError, match="Cannot read"):
        ConsensusConfig(iterations=2, interventions=("neuron:1",)).check()


def test_generate_cli_ablates_and_records_it_in_the_json(tiny_gpt2_dir, lm, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", A, "--greedy", "--max-new-tokens", "6",
                 "--ablate", "head:0.1", "--ablate", "mlp:2:mean", "--json", str(out)])
    _, err = capsys.readouterr()
    assert code == 0 and "interventions: head:0.1, mlp:2:mean" in err
    data = json.loads(out.read_text())
    assert [r["spec"] for r in data["interventions"]] == ["head:0.1", "mlp:2:mean"]
    ref = generate_with(lm, A, SamplingConfig(greedy=True, max_new_tokens=6), from_flags(["head:0.1", "mlp:2:mean"]))
    assert data["completion"] == ref.completion


def test_generate_cli_steers_with_a_vector_file(tiny_gpt2_dir, lm, tmp_path, capsys):
    vec = np.zeros(lm.stack.d_model, np.float32)
    vec[3] = 50.0
    np.save(tmp_path / "v.npy", vec)
    base = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", A, "--greedy", "--max-new-tokens", "6"])
    plain, _ = capsys.readouterr()
    code = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", A, "--greedy", "--max-new-tokens", "6",
                 "--steer-vector", f"{tmp_path / 'v.npy'}@blocks.2.hook_resid_post"])
    steered, _ = capsys.readouterr()
    assert base == code == 0 and steered != plain


@pytest.mark.parametrize("argv, words", [
    (["--ablate", "head:9.0"], "layer 9"),
    (["--ablate", "oops"], "Cannot read the ablation"),
    (["--steer", "0.1=2"], "transcoder set"),
    (["--steer-vector", "missing.npy@blocks.0.hook_resid_post"], "does not exist"),
    (["--steer-vector", "v.npy@blocks.0.hook_nothing"], "no activation point"),
])
def test_bad_intervention_flags_exit_2_with_one_line(tiny_gpt2_dir, tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "v.npy", np.zeros(32, np.float32))
    code = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", A, "--greedy", "--max-new-tokens", "2",
                 "--transcoders", str(tmp_path / "none"), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and words in err and "Traceback" not in err


def test_consensus_cli_ablates_one_mlp(tiny_gpt2_dir, lm, tmp_path, capsys):
    code = main(["consensus", "--model", str(tiny_gpt2_dir), "--prompt", A, "--size", "2", "--ablate", "mlp:0",
                 "--savefile", str(tmp_path / "run")])
    _, err = capsys.readouterr()
    assert code == 0 and "interventions: mlp:0" in err
    ref = run_consensus(lm, [A], ConsensusConfig(iterations=2, interventions=("mlp:0",)))
    np.testing.assert_array_equal(np.load(tmp_path / "run.npy"), ref.metric)
    assert torch.is_grad_enabled()
