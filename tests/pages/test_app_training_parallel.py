"""The Training form's parallel controls: DDP or FSDP, activation checkpointing, and the memory each
preset needs under both, reaching the launched run's config."""
from __future__ import annotations

from app_harness import open_app

from core.training.memory import fits_table
from pages.parts.training_form import preset_memory_markdown
from tests.pages.test_app_training import PAGE, TR_MIN, launch, launched, one_error  # noqa: F401


def test_parallel_mode_and_activation_checkpointing_reach_the_run(runs_root, launched):  # noqa: F811
    at = open_app(PAGE)
    box = at.selectbox(key="tr_parallel")
    assert box.options == ["auto: DDP if a replica fits", "DDP (replicas)", "FSDP (sharded)"]
    assert box.value == "auto" and at.toggle(key="tr_activation_checkpointing").value is False
    launch(at, **{**TR_MIN, "lr": None, "epochs": None}, parallel="fsdp", activation_checkpointing=True)
    one_error(at, "captured")
    (cfg, _), = launched
    assert (cfg.parallel, cfg.activation_checkpointing) == ("fsdp", True)


def test_the_form_shows_what_each_preset_needs_under_ddp_and_fsdp(runs_root):  # noqa: F811
    at = open_app(PAGE)
    expected = preset_memory_markdown(fits_table(None), False)
    assert expected in [m.value for m in at.markdown]
    assert "| gpt3-davinci | 174,592 M | 2,835.1 GB (does not fit) | 64 GPUs x 64.0 GB |" in expected
    assert "| gpt2-small | 124 M | 2.8 GB | 1 GPU x 2.8 GB |" in expected
