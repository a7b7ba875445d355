"""Code runs only when asked: every call into transformers that could run a repository's own Python
(``*.from_pretrained``, ``pipeline``) names ``trust_remote_code`` itself, in every file of core/.
Left out, transformers decides (and on a terminal, asks), so the test reads the source, not a run.

Each file of core/ is its own case, so a failure names the file and line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core"
CALLS = ("from_pretrained", "pipeline")


def offenders(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line call`` for each call of CALLS without a ``trust_remote_code=`` keyword."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in CALLS and not any(k.arg == "trust_remote_code" for k in node.keywords):
            found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node.func)}(...)")
    return found


FILES = sorted(str(p.relative_to(ROOT)) for p in CORE.rglob("*.py"))


@pytest.mark.parametrize("name", FILES)
def test_every_remote_code_call_says_whether_it_trusts(name):
    bad = offenders(ROOT / name)
    assert not bad, "these calls leave trust_remote_code to transformers: " + "; ".join(bad)


def test_the_scan_sees_what_it_looks_for(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("from transformers import AutoModel, pipeline\n"
                    "AutoModel.from_pretrained('x')\n"
                    "AutoModel.from_pretrained('x', trust_remote_code=False)\n"
                    "pipeline('text-generation')\n")
    assert offenders(path, tmp_path) == ["probe.py:2 AutoModel.from_pretrained(...)", "probe.py:4 pipeline(...)"]


def test_counting_a_families_parameters_never_asks_about_a_configs_own_code(monkeypatch):
    """A supported family's config that also names code of its own (auto_map) is counted on
    transformers' own class, and transformers is told so: it never has to guess (left to guess, it
    may ask on a terminal), and the folder's code is never run."""
    import transformers.models.auto.auto_factory as auto_factory
    from transformers import LlamaConfig

    from core.models.loading import check_family_sizes

    asked = []
    resolve = auto_factory.resolve_trust_remote_code

    def spy(trust_remote_code, *args, **kwargs):
        asked.append(trust_remote_code)
        return resolve(trust_remote_code, *args, **kwargs)

    monkeypatch.setattr(auto_factory, "resolve_trust_remote_code", spy)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.auto_map = {"AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}
    plain = LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "auto_map"})
    assert check_family_sizes(cfg, "own") == check_family_sizes(plain, "own") > 0
    assert asked == [False]
