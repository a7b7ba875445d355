"""What the pages draw from a cache: every head's attention pattern, and one transcoder feature's
activation on each token of a text."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .api import as_ids, run_with_cache
from ..errors import LabError
from ..models.hooks import act_name

if TYPE_CHECKING:
    from ..interp.transcoder import TranscoderSet
    from ..models.loading import LoadedModel


def attention_patterns(lm: "LoadedModel", text: str, fns: dict | None = None) -> tuple[list[str], np.ndarray]:
    """``(tokens, patterns (L, H, T, T) float32)``: every head's ``attn.hook_pattern`` on ``text``
    (query rows, key columns), with the hooks ``fns`` (an ablation, say) active."""
    ids = as_ids(lm, text)
    names = [act_name("pattern", i) for i in range(lm.stack.n_layer)]
    _, cache = run_with_cache(lm, ids, names, fns=fns)
    pats = torch.stack([cache[n][0].float() for n in names]).cpu().numpy()      # (L, H, T, T)
    return [lm.tokenizer.token_str(int(t)) for t in ids[0]], pats


def feature_activations(lm: "LoadedModel", tset: "TranscoderSet", layer: int, feature: int,
                        text: str) -> tuple[list[str], list[float]]:
    """``(tokens, activation of transcoder feature ``feature`` of ``layer`` on each)`` for ``text``."""
    tc = tset[layer]
    if not 0 <= feature < tc.n_features:
        raise LabError(f"Layer {layer}'s transcoder has features 0..{tc.n_features - 1}; there is no feature {feature}.")
    ids = as_ids(lm, text)
    name = act_name("ln2_normalized", layer)
    _, cache = run_with_cache(lm, ids, [name])
    with torch.no_grad():
        acts = tc.encode(cache[name].to(tc.W_enc.device, tc.W_enc.dtype))[0, :, feature].float().cpu()
    return [lm.tokenizer.token_str(int(t)) for t in ids[0]], [float(a) for a in acts]
