"""Live interventions: cache, ablate, patch and steer any named activation of any walk.

TransformerLens's vocabulary on GPT Lab's layer-stack adapter, for every family:

- :func:`run_with_cache` ``(lm, tokens, names=...) -> (logits, cache)``; :func:`hook_names` lists the points;
- :func:`hooks` ``(lm, {name: fn})``: a ``with`` block in which every walk (generation, consensus,
  transcoders, the logit lens) runs ``fn(tensor, hook)`` at ``name``; :func:`hooked` wraps a generator;
- ablation and steering hooks (:mod:`.ablation`): :func:`zero_ablation`, :func:`mean_ablation`,
  :func:`steering`, :func:`transcoder_splice`;
- activation patching (:mod:`.patching`): :func:`patch`, and :func:`patching_sweep` over every
  (layer, position) in one call;
- the ``--ablate`` / ``--steer`` specs (:mod:`.spec`, torch-free) and what they do to a generation
  (:mod:`.run`: :func:`generate_with`, :func:`compare_generation`).

Hooks live in the calling context, never on the shared model (:mod:`core.models.hookpoints`).
"""
from ..lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, {
    **names(".api", "ActivationCache", "HookPoint", "as_ids", "check_names", "hook_names", "hooked", "hooks",
            "run_with_cache", "run_with_hooks"),
    **names(".ablation", "build_hooks", "mean_ablation", "prompt_means", "steering", "transcoder_splice",
            "zero_ablation"),
    **names(".patching", "PatchingResult", "patch", "patching_hooks", "patching_sweep"),
    **names(".inspect", "attention_patterns", "feature_activations"),
    **names(".spec", "Ablation", "Interventions", "Steer", "SteerVector", "from_flags", "parse_specs"),
    **names(".run", "Comparison", "IntervenedSampler", "compare_generation", "generate_with", "intervened_sampler",
            "prepare", "with_interventions"),
})
