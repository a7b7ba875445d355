"""Explain a completion: generate from a prompt, find the transcoder features that drove each
layer, and describe each layer and the whole in words, with scores.

Attribution is token-level: the completion is run through the model with every MLP written as
``transcoder(x) + error`` (the error term is the MLP's output minus the transcoder's, held
constant, so the forward pass is exactly the original model's). The target is the sum over
generated tokens of their log-probability. For each layer, position and feature,
``attribution = activation * d target / d activation``: the feature's activation at that token
times its effect on what the model went on to write, through every later layer (a first-order,
gradient-times-activation estimate). Each layer's features are ranked by the sum of their
token-level attributions (what they did, summed token by token, not an average activation).

Autoregressive models predict generated token ``j`` at position ``P + j - 1``. Diffusion models
are attributed on their first denoising state, the prompt followed by masks, predicting every
generated token at its own position: what the model brought to the blank canvas. A diffusion
completion is then explained step by step as well: each denoising step read the state the steps
before it left (prompt, tokens revealed so far, masks) and revealed some tokens; the same
attribution on that state, with those tokens as the target, names the features (over every layer)
that drove that step.

What is written (the reference pipeline's layout: per-layer descriptions, a total description,
two scores):

- Each layer's description cites its top features *on this text*, ranked by attribution: the
  tokens of the prompt + completion each fired on (only tokens that occur there) and the
  feature's stored explanation. The total description ranks the layers by their share of the
  attribution.
- *Quality* of the completion: with the built-in explainer, the model's perplexity on the tokens
  it generated, ``exp(-mean log-prob)`` (lower is more confident; a number about the model, not a
  judgement of the text); with a language-model explainer, its 1-10 grade of the text (an LM judge).
- *Interpretability* on this completion: how well the cited explanations predict where their
  features fired here. For each cited feature, the explainer's detector (the rule detector for
  the built-in explainer, the LM's yes/no probability otherwise) is asked for every token of the
  text whether the explanation describes that token; the AUC of its answers against whether the
  feature actually fired there is the feature's score, and the completion's score is their mean
  weighted by attribution (0.5 is chance, 1 perfect), with ``n`` the token judgements made.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Union

import torch

from ..errors import LabError
from ..generation.config import DiffusionConfig, SamplingConfig
from ..generation.sampler import sampler_for
from .config import EXPLAIN_MAX_NEW_TOKENS, EXPLAIN_TOP_FEATURES
from .explain import BuiltinExplainer, Cited, Explainer, FeatureEvidence
from .scoring import auc, score_feature
from .store import FeatureStore

if TYPE_CHECKING:
    from ..models.loading import LoadedModel
    from .transcoder import TranscoderSet


@dataclass
class FeatureAttribution:
    layer: int
    feature: int
    attribution: float                 # sum over positions of activation x gradient
    max_activation: float
    positions: list[tuple[int, str, float, float]]   # (position, token, activation, attribution), strongest first
    explanation: str | None = None
    score: float | None = None         # held-out detection AUC of that explanation
    score_n: int = 0                   # held-out windows it was scored on
    completion_auc: float | None = None  # how well the explanation predicts where it fired on this text
    completion_n: int = 0              # tokens of this text judged for it


@dataclass
class LayerExplanation:
    layer: int
    description: str
    features: list[FeatureAttribution]
    share: float                       # this layer's share of the total |attribution| over layers
    per_token: list[float]             # summed attribution of the layer's features at each input position
                                       # (autoregressive: the last token is not an input, so one shorter)


@dataclass
class StepFeature:
    """A feature that drove one denoising step: its summed attribution on the tokens revealed then."""

    layer: int
    feature: int
    attribution: float
    explanation: str | None = None


@dataclass
class DenoisingStepExplanation:
    step: int                          # 1-based, as the sampler counts
    read: str                          # the generation as the model read it at this step, masks as [MASK]
    revealed: list[tuple[int, str]]    # (position, token) revealed at this step
    features: list[StepFeature]        # the features (every layer) that drove these tokens most, strongest first
    mean_logprob: float                # of the revealed tokens, under the model at this step


@dataclass
class CompletionScore:
    """One of the two scores of an explained completion (module docstring), with its sample size."""

    name: str                          # "perplexity" | "LM judge grade" | "interpretability AUC"
    value: float | None
    n: int                             # tokens (perplexity, interpretability judgements) or texts graded
    definition: str

    @property
    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if self.name == "LM judge grade":
            return f"{self.value:.0f}/10"
        return f"{self.value:.2f}" if self.name != "perplexity" else f"{self.value:.3g}"

    def text(self) -> str:
        unit = {"perplexity": "generated tokens", "LM judge grade": "completion",
                "interpretability AUC": "token judgements"}.get(self.name, "")
        return f"{self.name} {self.shown} (n={self.n:,} {unit})"


@dataclass
class CompletionExplanation:
    prompt: str
    completion: str
    tokens: list[str]                  # prompt + completion tokens (for diffusion: the final ones)
    n_prompt: int
    layers: list[LayerExplanation]
    total_description: str
    quality: CompletionScore           # perplexity, or an LM judge's grade (module docstring)
    interpretability: CompletionScore  # cited explanations vs where their features fired here
    mean_logprob: float | None         # of the generated tokens, under the model
    explainer: str
    objective: str
    seconds: float
    steps: list[DenoisingStepExplanation] = field(default_factory=list)  # diffusion: one per step that revealed

    @property
    def layer_descriptions(self) -> list[str]:
        return [l.description for l in self.layers]

    @property
    def output_score(self) -> str:
        """The quality score as the reference's ``models output score=`` line shows it."""
        return self.quality.text()

    @property
    def interpretability_score(self) -> str:
        return self.interpretability.text()

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class CompletionStarted:
    prompt: str
    layers: list[int]


@dataclass
class Generated:
    completion: str
    n_tokens: int


@dataclass
class LayerExplained:
    explanation: LayerExplanation


@dataclass
class StepExplained:
    step: DenoisingStepExplanation
    total_steps: int


@dataclass
class CompletionExplained:
    result: CompletionExplanation


CompletionEvent = Union[CompletionStarted, Generated, LayerExplained, StepExplained, CompletionExplained]


def _generate(lm: "LoadedModel", prompt: str, settings):
    """``(result, prompt_ids, completion_ids, attribution input (1, T), targets [(position, token)])``."""
    sampler = sampler_for(lm)
    res = sampler.generate(lm, prompt, settings if settings is not None else completion_settings(lm))
    prompt_ids, new = sampler.token_ids(lm, res)
    if not new:
        raise LabError("The model ended the completion at once (end of text); try another prompt or sampling.")
    x, targets = sampler.reads(prompt_ids, new)  # prompt + masks for a diffusion model; no last token for a causal one
    return res, prompt_ids, new, torch.tensor([x]), targets


def completion_settings(lm: "LoadedModel", max_new_tokens: int = EXPLAIN_MAX_NEW_TOKENS, *,
                        temperature: float | None = None, top_p: float | None = None, seed: int | None = 0,
                        steps: int | None = None):
    """The generation settings of a completion to explain, in the form ``lm``'s sampler takes:
    greedy when ``temperature`` is None, else sampled; a diffusion model denoises in ``steps``
    (one per token by default). Checked, so a bad value fails here in one sentence. The CLI's
    ``explain``, the Features page and :func:`explain_completion`'s default all use this."""
    return sampler_for(lm).settings(int(max_new_tokens), greedy=temperature is None, temperature=temperature,
                                    top_p=top_p, seed=seed, steps=int(steps or max_new_tokens), n_alternatives=0)


def attribute(lm: "LoadedModel", tset: "TranscoderSet", x: torch.Tensor, targets: list[tuple[int, int]],
              layers: list[int] | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], float]:
    """``(activations {layer: (T, F)}, attributions {layer: (T, F)}, mean target log-prob)`` for
    model input ``x`` ``(1, T)`` and ``targets`` ``[(position, token id)]`` (module docstring)."""
    stack = lm.stack
    layers = tset.layers if layers is None else layers
    acts: dict[int, torch.Tensor] = {}

    def replacement(i: int):
        tc, mlp = tset[i], stack.mlp(i)

        def fn(h_in: torch.Tensor) -> torch.Tensor:
            a = tc.encode(h_in.float())                                     # (1, T, F)
            acts[i] = a
            out = tc.decode(a)
            err = (mlp(h_in).float() - out).detach()
            return (out + err).to(h_in.dtype)
        return fn

    with torch.enable_grad():
        h = stack.embed(x.to(stack.device))
        for i in range(stack.n_layer):
            h = stack.block(i, h, mlp=replacement(i) if i in layers else None)
        logp = stack.unembed(stack.final_norm(h)).float().log_softmax(-1)  # (1, T, V)
        pos = torch.tensor([p for p, _ in targets], device=logp.device)
        tok = torch.tensor([t for _, t in targets], device=logp.device)
        picked = logp[0, pos, tok]                                          # (n_targets,)
        grads = torch.autograd.grad(picked.sum(), [acts[i] for i in layers])
    a_out = {i: acts[i][0].detach() for i in layers}
    attr = {i: (acts[i][0] * g[0]).detach() for i, g in zip(layers, grads)}
    return a_out, attr, float(picked.detach().mean())


def explain_completion(lm: "LoadedModel", tset: "TranscoderSet", prompt: str, *,
                       store: FeatureStore | None = None, explainer: Explainer | None = None,
                       settings: SamplingConfig | DiffusionConfig | None = None,
                       top_features: int = EXPLAIN_TOP_FEATURES,
                       n_positions: int = 5, layers: list[int] | None = None) -> Iterator[CompletionEvent]:
    """Generate from ``prompt`` (greedy, :data:`.config.EXPLAIN_MAX_NEW_TOKENS` tokens, unless
    ``settings`` from :func:`.config.completion_settings` say otherwise) and explain it.

    Feature explanations come from ``store`` (written by this explainer, else the latest); a
    top feature without one is explained on the spot from its stored evidence. Without a store
    features are named by address only and the interpretability score is None.
    """
    explainer = explainer or BuiltinExplainer()
    tset.check_model(lm)
    layers = tset.layers if layers is None else sorted(layers)
    t0 = time.perf_counter()
    yield CompletionStarted(prompt=prompt, layers=layers)
    generated, prompt_ids, new_ids, x, targets = _generate(lm, prompt, settings)
    completion = generated.completion
    yield Generated(completion=completion, n_tokens=len(new_ids))
    acts, attr, mean_lp = attribute(lm, tset, x, targets, layers)

    tokens = [lm.tokenizer.token_str(t) for t in prompt_ids + new_ids]
    totals = {i: float(attr[i].sum(0).abs().sum()) for i in layers}
    grand = sum(totals.values()) or 1.0
    detector = explainer.detector()
    explained_layers: list[LayerExplanation] = []
    stored_ex = _stored_explainer(store, explainer)
    judged: list[tuple[float, float, int]] = []          # (AUC on this text, weight, judgements)
    for i in layers:
        per_feature = attr[i].sum(0)                                        # (F,)
        k = min(top_features, per_feature.numel())
        top = per_feature.topk(k).indices.tolist()
        feats: list[FeatureAttribution] = []
        for f in top:
            col_attr, col_act = attr[i][:, f], acts[i][:, f]
            order = col_attr.abs().argsort(descending=True)[:n_positions].tolist()
            positions = [(p, tokens[p] if p < len(tokens) else "", float(col_act[p]), float(col_attr[p]))
                         for p in order if float(col_act[p]) > 0]
            fa = FeatureAttribution(layer=i, feature=f, attribution=float(per_feature[f]),
                                    max_activation=float(col_act.max()), positions=positions)
            if store is not None:
                fa.explanation, fa.score, fa.score_n = _explanation_for(store, explainer, stored_ex, detector, i, f)
            if fa.explanation and fa.attribution > 0 and positions:
                fa.completion_auc, fa.completion_n = _on_this_text(detector, fa.explanation,
                                                                   tokens[:col_act.numel()], col_act.tolist())
                if fa.completion_auc is not None:
                    judged.append((fa.completion_auc, fa.attribution, fa.completion_n))
            feats.append(fa)
        cited = [Cited(feature=fa.feature, tokens=[t for _, t, _, _ in fa.positions], attribution=fa.attribution,
                       explanation=fa.explanation, score=fa.score) for fa in feats if fa.attribution > 0]
        description = explainer.describe_completion_layer(i, cited)
        le = LayerExplanation(layer=i, description=description, features=feats, share=totals[i] / grand,
                              per_token=attr[i].sum(1).tolist())
        explained_layers.append(le)
        yield LayerExplained(le)
    by_share = sorted(explained_layers, key=lambda l: l.share, reverse=True)
    total = explainer.describe_total([(l.layer, l.description) for l in by_share], prompt, completion)
    steps: list[DenoisingStepExplanation] = []
    if sampler_for(lm).denoises:
        for step in denoising_steps(lm, tset, generated, layers, top_features):
            for sf in step.features:
                if store is not None:
                    sf.explanation = _explanation_for(store, explainer, stored_ex, detector, sf.layer, sf.feature)[0]
            steps.append(step)
            yield StepExplained(step, total_steps=generated.steps)
    mean_lp_ok = mean_lp if math.isfinite(mean_lp) else None
    result = CompletionExplanation(
        prompt=prompt, completion=completion, tokens=tokens, n_prompt=len(prompt_ids), layers=explained_layers,
        total_description=total, quality=_quality(explainer, prompt, completion, mean_lp_ok, len(new_ids)),
        interpretability=_interpretability(judged, explainer.name), mean_logprob=mean_lp_ok,
        explainer=explainer.name, objective=lm.objective, seconds=time.perf_counter() - t0, steps=steps)
    yield CompletionExplained(result)


def denoising_steps(lm: "LoadedModel", tset: "TranscoderSet", result, layers: list[int],
                    top_features: int) -> Iterator[DenoisingStepExplanation]:
    """Each denoising step of a diffusion ``result`` that revealed tokens, explained (module
    docstring): the state it read, the tokens it revealed, and the ``top_features`` features of any
    layer with the largest attribution to them (explanations are filled in by the caller)."""
    from ..generation.diffusion import render, state_masked

    P = len(result.prompt_ids)
    tok = lm.tokenizer
    for s in range(1, len(result.states)):
        revealed = [P + j for j, r in enumerate(result.reveal_step) if r == s]
        if not revealed:
            continue                     # a step that revealed nothing (more steps than tokens) did nothing
        state = result.states[s - 1]
        targets = [(p, result.states[s][p]) for p in revealed]
        _, attr, mean_lp = attribute(lm, tset, torch.tensor([state]), targets, layers)
        per_feature = torch.stack([attr[i].sum(0) for i in layers])   # (layers, features)
        best = per_feature.flatten().topk(min(top_features, per_feature.numel()))
        width = per_feature.shape[1]
        features = [StepFeature(layer=layers[j // width], feature=j % width, attribution=v)
                    for v, j in zip(best.values.tolist(), best.indices.tolist()) if v > 0]
        read = render(tok, state[P:], state_masked(result, s - 1))
        yield DenoisingStepExplanation(step=s, read=read, revealed=[(p, tok.token_str(t)) for p, t in targets],
                                       features=features, mean_logprob=mean_lp)


def _on_this_text(detector, explanation: str, tokens: list[str], acts: list[float]) -> tuple[float | None, int]:
    """``(AUC, judgements)``: the detector's probability, token by token, that the explanation describes
    that token of the text, against whether the feature fired there (module docstring)."""
    n = min(len(tokens), len(acts))
    if n == 0:
        return None, 0
    prob = detector.fuzz(explanation, [(tokens[:n], [p]) for p in range(n)])
    return auc(prob, [a > 0 for a in acts[:n]]), n


def _quality(explainer: Explainer, prompt: str, completion: str, mean_lp: float | None, n_new: int) -> CompletionScore:
    if explainer.judges_text():
        return CompletionScore("LM judge grade", explainer.rate_output(prompt, completion, mean_lp), 1,
                               f"{explainer.name}'s 1-10 grade of how fluent and sensible the text is.")
    return CompletionScore("perplexity", math.exp(-mean_lp) if mean_lp is not None else None, n_new,
                           "The model's perplexity on the tokens it generated, exp(-mean log-prob): 1 is certain, "
                           "higher is less sure. A number about the model, not a judgement of the text.")


def _interpretability(judged: list[tuple[float, float, int]], detector_name: str) -> CompletionScore:
    definition = ("How well the cited explanations predict where their features fired on this text: per feature, "
                  "the AUC of the explainer's token-by-token verdicts against where it fired; their mean weighted by "
                  "attribution. 0.5 is chance, 1 perfect.")
    weight = sum(w for _, w, _ in judged)
    if not judged or weight <= 0:
        return CompletionScore("interpretability AUC", None, 0, definition)
    return CompletionScore("interpretability AUC", sum(a * w for a, w, _ in judged) / weight,
                           sum(n for _, _, n in judged), definition)


def _stored_explainer(store: FeatureStore | None, explainer: Explainer) -> str | None:
    if store is None:
        return None
    names = store.explainers()
    return explainer.name if explainer.name in names else None


def _explanation_for(store: FeatureStore, explainer: Explainer, stored_ex: str | None, detector, layer: int,
                     feature: int) -> tuple[str | None, float | None, int]:
    """The stored explanation, its detection AUC and that score's sample size, or one made (and scored) now."""
    if stored_ex is not None:
        text = store.explanation(layer, feature, stored_ex)
        if text is not None:
            sc = store.scores(layer, feature).get(stored_ex, {}).get("detection")
            return text, (sc.value if sc is not None else None), (sc.n if sc is not None else 0)
    try:
        ev = FeatureEvidence.from_store(store, layer, feature)
    except LabError:
        return None, None, 0  # never fired during collection: nothing to explain it from
    if not ev.top:
        return None, None, 0
    text = explainer.explain_feature(ev)
    got = score_feature(store, layer, feature, text, detector)
    return text, (got[0].value if got else None), (got[0].n if got else 0)


def run_explain_completion(*args, **kwargs) -> CompletionExplanation:
    """Drain :func:`explain_completion` and return its result (scripts, tests)."""
    for ev in explain_completion(*args, **kwargs):
        if isinstance(ev, CompletionExplained):
            return ev.result
    raise AssertionError("explain_completion ended without a result")


__all__ = ["FeatureAttribution", "LayerExplanation", "CompletionExplanation", "CompletionStarted", "Generated",
           "LayerExplained", "StepExplained", "CompletionExplained", "CompletionEvent", "attribute", "explain_completion",
           "run_explain_completion", "CompletionScore", "DenoisingStepExplanation", "StepFeature", "denoising_steps"]
