"""Activation names: one builder for every address an activation, a transcoder or a feature has.

Names follow TransformerLens (``transformer_lens.utils.get_act_name``), so a researcher reads
the same address in the layer-stack adapter, the transcoder files, the feature store, the CLI
and the pages, and a name copied from one of them means the same tensor in every model family.
Nothing else in GPT Lab types these templates: call :func:`act_name`.

The short keys are TransformerLens' own names, with the norm a ``normalized`` belongs to in
front (``ln2_normalized``), because the distinction matters: ``mlp_in`` is the residual stream
*before* the second norm (``blocks.{i}.hook_mlp_in``), ``ln2_normalized`` is that stream *after*
it (``blocks.{i}.ln2.hook_normalized``), which is what an MLP, and so a transcoder, reads.

Torch-free, so command-line help and file readers can name activations without loading torch.
"""
from __future__ import annotations

# key -> template; ``{layer}`` is a block index, ``{feature}`` a transcoder feature.
ACT_NAMES: dict[str, str] = {
    "embed": "hook_embed",                                   # token embeddings
    "pos_embed": "hook_pos_embed",                           # position embeddings
    "resid_pre": "blocks.{layer}.hook_resid_pre",            # the stream entering block i
    "ln1_normalized": "blocks.{layer}.ln1.hook_normalized",  # ... after the first norm: attention's input
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "z": "blocks.{layer}.attn.hook_z",                       # per-head attention output before the projection
    "attn_out": "blocks.{layer}.hook_attn_out",              # attention's write into the stream
    "resid_mid": "blocks.{layer}.hook_resid_mid",            # the stream after attention
    "mlp_in": "blocks.{layer}.hook_mlp_in",                  # the stream the MLP sublayer reads, before ln2
    "ln2_normalized": "blocks.{layer}.ln2.hook_normalized",  # ... after ln2: the MLP's (and a transcoder's) input
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",                # the MLP's write into the stream
    "resid_post": "blocks.{layer}.hook_resid_post",          # the stream leaving block i
    "ln_final_normalized": "ln_final.hook_normalized",       # the final norm's output, before the unembedding
    "transcoder": "blocks.{layer}.transcoder.{feature}",     # feature f of block i's transcoder
}


def act_name(point: str, layer: int | None = None, feature: int | None = None) -> str:
    """The address of activation ``point`` (a key of :data:`ACT_NAMES`) in block ``layer``, or of
    ``feature`` of that block's transcoder: ``act_name("ln2_normalized", 3)`` ->
    ``"blocks.3.ln2.hook_normalized"``, ``act_name("transcoder", 3, 17)`` -> ``"blocks.3.transcoder.17"``.

    A block-level point without ``layer`` (or a model-level one with it) is a programming error
    and raises ValueError, so a wrong name never reaches a file."""
    template = ACT_NAMES.get(point)
    if template is None:
        raise ValueError(f"Unknown activation point {point!r}; known: {', '.join(ACT_NAMES)}.")
    needs_layer, needs_feature = "{layer}" in template, "{feature}" in template
    if needs_layer != (layer is not None) or needs_feature != (feature is not None):
        takes = f"{'a layer' if needs_layer else 'no layer'} and {'a feature' if needs_feature else 'no feature'}"
        raise ValueError(f"Activation point {point!r} ({template}) takes {takes} (got layer={layer!r}, "
                         f"feature={feature!r}).")
    return template.format(layer=int(layer) if needs_layer else None,
                           feature=int(feature) if needs_feature else None)
