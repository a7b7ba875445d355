"""Explaining a completion honestly, on the shipped default model and its feature store: the layer
descriptions cite only tokens of the text the model read and wrote, ranked by attribution; the two
scores are what they say (the model's perplexity on its own tokens, recomputed here; the cited
explanations' AUC on this text, recomputed here from the rule detector), each with its sample size;
an LM explainer's grade replaces the perplexity as the quality score."""
from __future__ import annotations

import math
import re

import pytest
import torch

from core.interp import FeatureStore, load_transcoder_set, run_explain_completion, store_path
from core.interp.completion import completion_settings
from core.interp.explain import BuiltinExplainer, PromptedExplainer
from core.interp.scoring import RuleDetector, auc, quoted_tokens
from core.models.loading import DEFAULT_DIR, load_model


@pytest.fixture(scope="module")
def shipped():
    lm = load_model("default")
    tset = load_transcoder_set(DEFAULT_DIR / "transcoders")
    store = FeatureStore(store_path(tset.folder), readonly=True)
    yield lm, tset, store
    store.close()


CITED = re.compile(r"«([^»]*)»")


def test_descriptions_cite_only_tokens_of_this_text_ranked_by_attribution(shipped):
    lm, tset, store = shipped
    res = run_explain_completion(lm, tset, "ROMEO:", store=store, settings=completion_settings(lm, 12))
    text_tokens = {t.replace("\n", "\\n").replace("\t", "\\t") for t in res.tokens}
    assert "".join(res.tokens) == res.prompt + res.completion
    cited_any = False
    for layer in res.layers:
        attributions = [fa.attribution for fa in layer.features]
        assert attributions == sorted(attributions, reverse=True)          # ranked by attribution
        for fa in layer.features:
            for p, tok, act, _ in fa.positions:
                assert res.tokens[p] == tok and act > 0                     # fired there, on this text
        cites = CITED.findall(layer.description)
        assert set(cites) <= text_tokens, (cites, layer.description)
        cited_any |= bool(cites)
        # each cited feature is named with its explanation's gist, strongest first
        named = [int(n) for n in re.findall(r"feature (\d+) on", layer.description)]
        top = [fa.feature for fa in layer.features if fa.attribution > 0 and fa.positions][:len(named)]
        assert named == top
    assert cited_any
    assert set(CITED.findall(res.total_description)) <= text_tokens
    assert res.total_description.startswith("Most of the completion came from layer ")


def test_the_two_scores_are_what_they_say(shipped):
    lm, tset, store = shipped
    settings = completion_settings(lm, 10)
    res = run_explain_completion(lm, tset, "JULIET:", store=store, settings=settings)
    # quality: the model's perplexity on the tokens it generated, recomputed from its logits
    ids = lm.tokenizer.encode(res.prompt + res.completion)
    n_prompt = res.n_prompt
    with torch.no_grad():
        logp = lm.stack.logits(torch.tensor([ids])).float().log_softmax(-1)[0]
    lp = [float(logp[p - 1, ids[p]]) for p in range(n_prompt, len(ids))]
    assert res.quality.name == "perplexity" and res.quality.n == len(lp) == 10
    assert res.quality.value == pytest.approx(math.exp(-sum(lp) / len(lp)), rel=1e-3)
    assert res.mean_logprob == pytest.approx(sum(lp) / len(lp), abs=1e-3)
    # interpretability: per cited feature, the rule detector's token-by-token verdicts against where
    # the feature fired on this text, AUC, weighted by attribution
    pairs, n = [], 0
    for layer in res.layers:
        for fa in layer.features:
            if fa.completion_auc is None:
                continue
            tokens = res.tokens[:len(layer.per_token)]
            quoted = set(quoted_tokens(fa.explanation))
            verdict = [float(t.replace("\n", "\\n").strip().lower() in quoted) for t in tokens]
            fired = {p for p, _, _, _ in fa.positions}
            assert fa.completion_auc == pytest.approx(
                auc(RuleDetector().fuzz(fa.explanation, [(tokens, [p]) for p in range(len(tokens))]),
                    _fired(lm, tset, res, layer.layer, fa.feature)))
            assert all(verdict[p] in (0.0, 1.0) for p in fired)
            pairs.append((fa.completion_auc, fa.attribution))
            n += len(tokens)
    assert pairs and res.interpretability.n == n
    assert res.interpretability.value == pytest.approx(sum(a * w for a, w in pairs) / sum(w for _, w in pairs))
    assert res.output_score == res.quality.text() and "(n=10 generated tokens)" in res.output_score


def _fired(lm, tset, res, layer, feature) -> list[bool]:
    """Where ``feature`` of ``layer`` fires on the explained text, recomputed from the model."""
    from core.interp.activations import mlp_io

    ids = torch.tensor([lm.tokenizer.encode(res.prompt + res.completion)[:-1]])
    with torch.no_grad():
        x = mlp_io(lm, ids, [layer])[layer][0]
        acts = tset[layer].encode(x.float())[0, :, feature]
    return (acts > 0).tolist()


class _Judge(PromptedExplainer):
    """A stand-in language model: grades every text 7, explains every feature as firing on " the",
    says yes with probability 0.8 to a marked " the" and 0.3 otherwise."""

    name = "lm:judge"
    max_input = 4096

    def count(self, text):
        return len(text) // 3

    def generate(self, prompts, max_new_tokens=None):
        return ["7" if "scale of 1 to 10" in p else 'fires on "the"' for p in prompts]

    def yes_probability(self, prompts):
        return [0.8 if "<< the>>" in p or "<<the>>" in p else 0.3 for p in prompts]


def test_an_lm_explainer_grades_the_text_instead(shipped):
    lm, tset, store = shipped
    res = run_explain_completion(lm, tset, "ROMEO:", store=store, explainer=_Judge(),
                                 settings=completion_settings(lm, 8))
    assert res.quality.name == "LM judge grade" and res.quality.value == 7 and res.quality.n == 1
    assert res.quality.shown == "7/10" and res.explainer == "lm:judge"
    assert res.interpretability.value is not None and 0 <= res.interpretability.value <= 1
    assert BuiltinExplainer().judges_text() is False and _Judge().judges_text() is True
