"""Interventions' defaults and choice lists, stated once (torch-free): the CLI's flags and the
pages' panels (Generate's Interventions panel, the Attention and Patching pages, the feature card's
"try it" and "steer" buttons) read them from here."""
from __future__ import annotations

ABLATION_KINDS = ("head", "attn", "mlp", "layer", "feature")   # what --ablate can name
ABLATION_MODES = ("zero", "mean")
STEER_RANGE = (-50.0, 50.0)      # the steering-strength slider
STEER_DEFAULT = 8.0              # its value when "steer with this feature" opens Generate
COMPARE_NEW_TOKENS = 20          # tokens the with/without comparison generates
ATTENTION_MAX_TOKENS = 48        # the attention grid shows at most this many tokens (the enlarged head all)
PATCH_POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")   # what a patching sweep can patch
PATCH_CLEAN = "Then Romeo and Juliet went to the church, and Romeo gave a ring to"
PATCH_CORRUPTED = "Then Romeo and Juliet went to the church, and Juliet gave a ring to"
