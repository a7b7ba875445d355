"""Explainers: turn a feature's evidence into words, layers' features into a layer description,
layers into a total description, and rate a completion and an interpretation from 1 to 10.

Three explainers, one interface (:class:`Explainer`):

- :class:`BuiltinExplainer` (``builtin``, the offline default) needs no model. It writes
  templated descriptions from the evidence: the tokens a feature fires on (in double quotes,
  weighted by activation), the token that usually precedes them, and the tokens it promotes
  (in single quotes). Double quotes are reserved for tokens it fires on, which is what the
  rule-based detector reads when scoring. Its output score is the model's own confidence in the
  completion and its interpretability score is derived from measured detection accuracy; it
  says so rather than pretending to judge.
- :class:`LMExplainer` (``lm:<spec>``): a transformers seq2seq (flan-t5 family) or causal LM,
  by hub id or local folder, fed the prompts of :mod:`core.interp.prompts` within its input
  length, greedy-decoded, answers parsed. Python code shipped with the explainer's repository
  runs only when the caller passes ``trust_remote_code=True`` (``--trust-remote-code``, or the
  page's tick box).
- :class:`RemoteExplainer` (``api:<model>@<url>``): any model behind an OpenAI-compatible server,
  asked the very same prompts (both are :class:`PromptedExplainer`); see :mod:`core.serve.client`.

:func:`describe_store` runs an explainer over a feature store: explanations, held-out scores
(:mod:`core.interp.scoring`), per-layer and total descriptions, as a generator of events.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, Union

import torch

from ..errors import LabError, ModelNotAvailableError, first_line, shorten
from ..models.loading import hub_reachable, offline_message
from .config import DESCRIBE_BATCH, DESCRIBE_N_TOP
from .prompts import (FALLBACK_MAX_INPUT, clean_token, feature_prompt, interpretation_rating_prompt, layer_prompt,
                      output_rating_prompt, parse_explanation, parse_score, parse_yes_no, total_prompt)
from .scoring import (Detector, LMDetector, RuleDetector, RuleSimulator, Simulator, interpretability_from_scores,
                      quoted_tokens, score_feature)
from .store import Context, FeatureStore, Score

if TYPE_CHECKING:
    from ..serve.client import Endpoint

BUILTIN = "builtin"
LM_PREFIX = "lm:"      # an LM explainer's name is LM_PREFIX + its spec


@dataclass
class FeatureEvidence:
    """What an explainer is shown about one feature (never its held-out windows)."""

    layer: int
    feature: int
    top: list[Context]
    top_tokens: list[tuple[str, int]] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    density: float = 0.0

    @classmethod
    def from_store(cls, store: FeatureStore, layer: int, feature: int, n_top: int = DESCRIBE_N_TOP,
                   set_id: int | None = None) -> "FeatureEvidence":
        st = store.stats(layer, feature, set_id)
        return cls(layer=layer, feature=feature, top=store.contexts(layer, feature, "top", n_top, set_id),
                   top_tokens=st.top_tokens, promoted=st.promoted, suppressed=st.suppressed, density=st.density)


class Explainer:
    """The interface every explainer offers; see the module docstring."""

    name: str = "explainer"

    def explain_features(self, evidence: Sequence[FeatureEvidence]) -> list[str]:
        raise NotImplementedError

    def explain_feature(self, evidence: FeatureEvidence) -> str:
        return self.explain_features([evidence])[0]

    def describe_layer(self, layer: int, items: Sequence[tuple[str, float]]) -> str:
        """``items``: ``(feature explanation, weight)``, most important first."""
        raise NotImplementedError

    def describe_total(self, layer_descriptions: Sequence[tuple[int, str]], prompt: str | None = None,
                       completion: str | None = None) -> str:
        raise NotImplementedError

    def rate_output(self, prompt: str, completion: str, mean_logprob: float | None = None) -> int | None:
        raise NotImplementedError

    def rate_interpretation(self, prompt: str, completion: str, description: str,
                            measured: int | None = None) -> int | None:
        raise NotImplementedError

    def detector(self) -> Detector:
        raise NotImplementedError

    def simulator(self) -> Simulator | None:
        return None


# -- built-in ---------------------------------------------------------------------------------

def _q(tokens: Sequence[str], quote: str = '"') -> str:
    return ", ".join(f"{quote}{t}{quote}" for t in tokens)


def _shown(text: str) -> str:
    return clean_token(text).strip()


class BuiltinExplainer(Explainer):
    """Templated descriptions from the evidence; deterministic, no model (see the module docstring)."""

    name = BUILTIN

    def __init__(self, max_tokens: int = 4, mass_share: float = 0.8):
        self.max_tokens, self.mass_share = max_tokens, mass_share

    def explain_features(self, evidence: Sequence[FeatureEvidence]) -> list[str]:
        return [self._one(ev) for ev in evidence]

    def _one(self, ev: FeatureEvidence) -> str:
        mass: Counter[str] = Counter()
        before: Counter[str] = Counter()
        for c in ev.top:
            tok = _shown(c.tokens[c.position])
            if tok:
                mass[tok] += max(c.activation, 0.0)
            if c.position > 0:
                prev = _shown(c.tokens[c.position - 1])
                if prev:
                    before[prev] += 1
        if not mass:
            for t, n in ev.top_tokens:
                if _shown(t):
                    mass[_shown(t)] += n
        total = sum(mass.values())
        fires: list[str] = []
        acc = 0.0
        for tok, m in mass.most_common():
            if len(fires) >= self.max_tokens or (fires and acc >= self.mass_share * total):
                break
            fires.append(tok)
            acc += m
        parts = []
        if fires:
            parts.append(f"fires on {_q(fires)}")
        else:
            parts.append("fires on whitespace or formatting tokens")
        if before and ev.top:
            prev, n = before.most_common(1)[0]
            if n >= max(2, len(ev.top) // 2):
                parts.append(f"usually after '{prev}'")
        promoted = [_shown(t) for t, _ in ev.promoted[:3] if _shown(t)]
        if promoted:
            parts.append(f"promotes {_q(promoted, quote=chr(39))}")
        text = "; ".join(parts)
        return text[0].upper() + text[1:]

    def describe_layer(self, layer: int, items: Sequence[tuple[str, float]]) -> str:
        weight: Counter[str] = Counter()
        for text, w in items:
            for tok in quoted_tokens(text):
                weight[tok] += abs(w)
        if not weight:
            return f"Layer {layer}: no readable features among the {len(items)} most important."
        toks = [t for t, _ in weight.most_common(6)]
        return f"Layer {layer} features fire on {_q(toks)}."

    def describe_total(self, layer_descriptions: Sequence[tuple[int, str]], prompt: str | None = None,
                       completion: str | None = None) -> str:
        parts = []
        for layer, text in layer_descriptions:
            toks = quoted_tokens(text)
            parts.append(f"layer {layer}: {_q(toks[:3])}" if toks else f"layer {layer}: -")
        lead = "The completion was driven by features that fire on" if completion is not None else \
            "Features by layer fire on"
        return f"{lead} " + "; ".join(parts) + "."

    def rate_output(self, prompt: str, completion: str, mean_logprob: float | None = None) -> int | None:
        """The model's own confidence, ``1 + 9 * exp(mean log-prob)`` of the completion's tokens:
        a number about the model, not a judgement of the text."""
        if mean_logprob is None or not math.isfinite(mean_logprob):
            return None
        return int(round(1 + 9 * min(1.0, math.exp(mean_logprob))))

    def rate_interpretation(self, prompt: str, completion: str, description: str,
                            measured: int | None = None) -> int | None:
        """The measured score (detection accuracy of the features used, mapped to 1-10)."""
        return measured

    def detector(self) -> Detector:
        return RuleDetector()

    def simulator(self) -> Simulator | None:
        return RuleSimulator()


# -- language-model explainer -------------------------------------------------------------------

def _remote_code_refused(spec: str) -> LabError:
    return LabError(f"Explainer '{spec}' ships its own Python code, which GPT Lab runs only when asked; pass "
                    f"--trust-remote-code (on the page: tick 'Trust the explainer's code') if you trust its authors.")


class PromptedExplainer(Explainer):
    """An explainer that is a language model answering the prompts of :mod:`core.interp.prompts`.

    Every description (feature, layer, total), rating and detection question is built and parsed
    here, once, so a local transformers model (:class:`LMExplainer`) and a model behind an
    OpenAI-compatible server (:class:`RemoteExplainer`) are asked exactly the same things. A
    subclass says how to count a prompt's tokens (``count``), how many it may have
    (``max_input``), and how to get greedy answers (``generate``) and yes/no verdicts (``yes_no``).
    """

    max_input: int

    def count(self, text: str) -> int:
        """Tokens ``text`` takes as the explainer's input."""
        raise NotImplementedError

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, one per prompt, in order."""
        raise NotImplementedError

    def yes_no(self, prompts: Sequence[str]) -> list[bool]:
        """Per prompt: is "yes" likelier than "no" as the answer?"""
        raise NotImplementedError

    def explain_features(self, evidence: Sequence[FeatureEvidence]) -> list[str]:
        prompts = [feature_prompt(ev.top, self.count, self.max_input, [clean_token(t) for t, _ in ev.promoted])[0]
                   for ev in evidence]
        return [parse_explanation(a) or "(no answer)" for a in self.generate(prompts)]

    def describe_layer(self, layer: int, items: Sequence[tuple[str, float]]) -> str:
        answer = self.generate([layer_prompt(layer, [t for t, _ in items], self.count, self.max_input)])[0]
        return parse_explanation(answer) or "(no answer)"

    def describe_total(self, layer_descriptions: Sequence[tuple[int, str]], prompt: str | None = None,
                       completion: str | None = None) -> str:
        answer = self.generate([total_prompt(layer_descriptions, self.count, self.max_input, prompt, completion)])[0]
        return parse_explanation(answer) or "(no answer)"

    def rate_output(self, prompt: str, completion: str, mean_logprob: float | None = None) -> int | None:
        return parse_score(self.generate([output_rating_prompt(prompt, completion)], 6)[0])

    def rate_interpretation(self, prompt: str, completion: str, description: str,
                            measured: int | None = None) -> int | None:
        return parse_score(self.generate([interpretation_rating_prompt(prompt, completion, description)], 6)[0])

    def detector(self) -> Detector:
        return LMDetector(self)


class LMExplainer(PromptedExplainer):
    """A transformers seq2seq or causal LM as explainer (flan-t5 in the reference pipeline)."""

    def __init__(self, spec: str, device: str = "cpu", max_new_tokens: int = 32, batch_size: int = 8,
                 max_input_tokens: int | None = None, trust_remote_code: bool = False):
        # transformers takes most of a second to import and only this explainer needs it
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.spec, self.device = spec, device
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.name = f"{LM_PREFIX}{spec}"
        local = Path(spec).expanduser().is_dir()
        trust = bool(trust_remote_code)  # the repository's own code runs only when asked
        kwargs = {"local_files_only": True}
        try:
            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust, **kwargs)
        except (OSError, ValueError) as e:
            if "trust_remote_code" in str(e):
                raise _remote_code_refused(spec) from None
            if local or not hub_reachable():
                if local:
                    raise LabError(f"{spec} is not a readable Hugging Face model folder; pass a folder with "
                                   f"config.json, a hub id such as google/flan-t5-base, or use --explainer "
                                   f"builtin.") from None
                raise ModelNotAvailableError(offline_message(spec).replace("--model default",
                                                                          "--explainer builtin")) from None
            kwargs = {}
            try:
                config = AutoConfig.from_pretrained(spec, trust_remote_code=trust, **kwargs)
            except ValueError as e:
                if "trust_remote_code" in str(e):
                    raise _remote_code_refused(spec) from None
                raise
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust, **kwargs)
            cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
            self.model = cls.from_pretrained(spec, trust_remote_code=trust, **kwargs).to(device).eval()
        except (OSError, ValueError) as e:
            if "trust_remote_code" in str(e):
                raise _remote_code_refused(spec) from None
            raise LabError(f"Could not load explainer '{spec}' ({shorten(first_line(e), 200)}); pass a seq2seq or "
                           f"causal LM folder or hub id, or use --explainer builtin.") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.seq2seq:
            self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"  # an overlong prompt loses its start, never the question
        self.max_input = max_input_tokens or self._max_input(config)

    def _max_input(self, config) -> int:
        limits = []
        mml = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(mml, int) and 0 < mml < 1_000_000:
            limits.append(mml)
        for key in ("n_positions", "max_position_embeddings"):
            v = getattr(config, key, None)
            if isinstance(v, int) and v > 0:
                limits.append(v)
        limit = min(limits) if limits else FALLBACK_MAX_INPUT
        if not self.seq2seq:  # a causal LM's answer shares its window with the prompt
            limit -= self.max_new_tokens
        if limit < 16:
            raise LabError(f"Explainer '{self.spec}' reads at most {limit} tokens, too few for any prompt; pick a "
                           f"model with a longer input.")
        return limit

    def count(self, text: str) -> int:
        """Tokens ``text`` takes as the explainer's input (special tokens included)."""
        return len(self.tokenizer(text)["input_ids"])

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, batched; inputs longer than the model's limit are cut (builders avoid that)."""
        out: list[str] = []
        n_new = max_new_tokens or self.max_new_tokens
        for s in range(0, len(prompts), self.batch_size):
            batch = list(prompts[s:s + self.batch_size])
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_input).to(self.device)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=n_new, do_sample=False, num_beams=1,
                                          pad_token_id=self.tokenizer.pad_token_id)
            if not self.seq2seq:
                gen = gen[:, enc["input_ids"].shape[1]:]
            out.extend(self.tokenizer.batch_decode(gen, skip_special_tokens=True))
        return out

    def _answer_ids(self, word: str) -> int | None:
        for text in ((word,) if self.seq2seq else (" " + word, word)):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                return int(ids[0])
        return None

    def yes_no(self, prompts: Sequence[str]) -> list[bool]:
        """Whether the first answer token is likelier "yes" than "no", batched."""
        yes, no = self._answer_ids("yes"), self._answer_ids("no")
        if yes is None or no is None or yes == no:  # the tokenizer cannot tell them apart: read the text
            return [parse_yes_no(a) is True for a in self.generate(prompts, 3)]
        out: list[bool] = []
        for s in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(list(prompts[s:s + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_input).to(self.device)
            with torch.no_grad():
                if self.seq2seq:
                    start = self.model.config.decoder_start_token_id
                    dec = torch.full((enc["input_ids"].shape[0], 1), start, dtype=torch.long, device=self.device)
                    logits = self.model(**enc, decoder_input_ids=dec).logits[:, -1]
                else:
                    logits = self.model(**enc).logits[:, -1]
            out.extend((logits[:, yes] > logits[:, no]).tolist())
        return out


class RemoteExplainer(PromptedExplainer):
    """A model behind any OpenAI-compatible server as explainer and scorer (vLLM, llama.cpp's server,
    Ollama, text-generation-webui, a hosted API, or ``python -m core serve``), asked the same
    prompts as :class:`LMExplainer`, greedily. The server's tokenizer is out of reach, so prompt
    lengths are estimated cautiously (:func:`core.serve.client.estimate_tokens`) within the context
    the server lists; timeouts, retries, rate limits and the key are :class:`~core.serve.client.Endpoint`'s
    business. Its name in a store is ``api:MODEL@URL`` (never the key)."""

    def __init__(self, endpoint: "Endpoint"):
        from ..serve.client import estimate_tokens

        self.endpoint = endpoint
        self.name = endpoint.name
        self.max_new_tokens = endpoint.config.max_new_tokens
        self.max_input = endpoint.context - self.max_new_tokens
        self._estimate = estimate_tokens
        if self.max_input < 16:
            raise LabError(f"Explainer '{endpoint.model}' at {endpoint.shown} leaves {self.max_input} tokens for a "
                           f"prompt, too few for any; serve a model with a longer context.")

    def count(self, text: str) -> int:
        return self._estimate(text)

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        n_new = max_new_tokens or self.max_new_tokens
        return self.endpoint.map(lambda p: self.endpoint.ask(p, n_new).text, list(prompts))

    def yes_no(self, prompts: Sequence[str]) -> list[bool]:
        return self.endpoint.map(self.endpoint.yes_no, list(prompts))


def is_endpoint_url(spec: str | None) -> bool:
    """Whether an explainer spec names a server (``http://...``) rather than a model."""
    return bool(spec) and spec.strip().lower().startswith(("http://", "https://"))


def load_explainer(spec: str | None = None, device: str = "cpu", *, trust_remote_code: bool = False,
                   model: str | None = None, **kwargs) -> Explainer:
    """``builtin`` (or None) for the model-free explainer; an ``http(s)://`` URL for the model
    ``model`` behind that OpenAI-compatible server (:class:`RemoteExplainer`; ``kwargs`` are
    :class:`~core.serve.config.EndpointConfig` fields); anything else is an LM spec (hub id or
    folder, optionally prefixed ``lm:``), whose repository code runs only with ``trust_remote_code``."""
    if spec is None or spec.strip().lower() in ("", BUILTIN):
        if model is not None:
            raise LabError("--explainer-model names a model behind a server; pass the server with --explainer URL.")
        return BuiltinExplainer()
    spec = spec.strip()
    if is_endpoint_url(spec):
        from ..serve.client import connect

        return RemoteExplainer(connect(spec, model, **kwargs))
    if model is not None:
        raise LabError(f"--explainer-model goes with a server URL (--explainer http://HOST:PORT/v1); "
                       f"'{spec}' is a model itself, so drop --explainer-model.")
    return LMExplainer(spec[len(LM_PREFIX):] if spec.startswith(LM_PREFIX) else spec, device=device,
                       trust_remote_code=trust_remote_code, **kwargs)


# -- describing a whole store ---------------------------------------------------------------------

@dataclass
class DescribeStarted:
    explainer: str
    layers: list[int]
    total: int                          # features to explain


@dataclass
class FeatureExplained:
    layer: int
    feature: int
    text: str
    scores: dict[str, float | None]     # method -> value
    done: int
    total: int


@dataclass
class LayerDescribed:
    layer: int
    text: str
    mean_score: float | None            # mean detection balanced accuracy of the layer's explained features


@dataclass
class DescribeFinished:
    explainer: str
    total_description: str
    layer_descriptions: dict[int, str]
    mean_scores: dict[int, float | None]
    seconds: float


DescribeEvent = Union[DescribeStarted, FeatureExplained, LayerDescribed, DescribeFinished]


def describe_store(store: FeatureStore, explainer: Explainer | None = None, *, layers: Sequence[int] | None = None,
                   max_features: int | None = None, n_top: int = DESCRIBE_N_TOP, score: bool = True,
                   batch_size: int | None = None,
                   layer_items: int = 10, set_id: int | None = None) -> Iterator[DescribeEvent]:
    """Explain (and score) the live features of ``layers`` (all by default), most frequent first,
    at most ``max_features`` per layer; then describe each layer from its ``layer_items`` most
    active explained features (density x mean activation) and the whole set from the layers.
    Each batch is committed once its explanations and scores are all in hand, so a stopped run keeps
    the batches it finished and a failed explainer call (a server gone, a refused key) writes
    nothing of its batch: the store never holds an explanation without its score."""
    explainer = explainer or BuiltinExplainer()
    batch_size = batch_size or DESCRIBE_BATCH["builtin" if isinstance(explainer, BuiltinExplainer) else "lm"]
    info = store.layers(set_id)
    all_layers = [l.layer for l in info]
    layers = all_layers if layers is None else [l for l in layers if l in all_layers]
    if not layers:
        raise LabError(f"The store has no such layer; it holds layers {all_layers}.")
    todo = {l: store.features(l, order_by="density", limit=max_features, set_id=set_id) for l in layers}
    total = sum(len(v) for v in todo.values())
    detector = explainer.detector() if score else None
    simulator = explainer.simulator() if score else None
    t0 = time.perf_counter()
    yield DescribeStarted(explainer=explainer.name, layers=list(layers), total=total)
    done = 0
    layer_text: dict[int, str] = {}
    mean_scores: dict[int, float | None] = {}
    for layer in layers:
        feats = todo[layer]
        det_values: list[float] = []
        for s in range(0, len(feats), batch_size):
            chunk = feats[s:s + batch_size]
            evs = [FeatureEvidence.from_store(store, layer, f.feature, n_top, set_id) for f in chunk]
            texts = explainer.explain_features(evs)
            score_rows: list[tuple[int, int, Score]] = []
            per_feature: list[dict[str, float | None]] = []
            for f, t in zip(chunk, texts):
                got = score_feature(store, layer, f.feature, t, detector, simulator, set_id) if score else []
                score_rows += [(layer, f.feature, sc) for sc in got]
                per_feature.append({sc.method: sc.value for sc in got})
                det = next((sc.value for sc in got if sc.method == "detection"), None)
                if det is not None:
                    det_values.append(det)
            # written only now: an explainer call that fails above leaves this batch out entirely
            store.put_explanations([(layer, f.feature, t) for f, t in zip(chunk, texts)], explainer.name, set_id)
            if score_rows:
                store.put_scores(score_rows, explainer.name, set_id)
            for f, t, sc in zip(chunk, texts, per_feature):
                done += 1
                yield FeatureExplained(layer=layer, feature=f.feature, text=t, scores=sc, done=done, total=total)
        ranked = sorted(feats, key=lambda f: f.density * f.mean_act, reverse=True)[:layer_items]
        exps = store.explanations(layer, explainer.name, set_id)
        items = [(exps[f.feature], f.density * f.mean_act) for f in ranked if f.feature in exps]
        layer_text[layer] = explainer.describe_layer(layer, items)
        store.put_description("layer", layer, explainer.name, layer_text[layer], set_id)
        mean_scores[layer] = sum(det_values) / len(det_values) if det_values else None
        yield LayerDescribed(layer=layer, text=layer_text[layer], mean_score=mean_scores[layer])
    total_text = explainer.describe_total(sorted(layer_text.items()))
    store.put_description("total", -1, explainer.name, total_text, set_id)
    yield DescribeFinished(explainer=explainer.name, total_description=total_text, layer_descriptions=layer_text,
                           mean_scores=mean_scores, seconds=time.perf_counter() - t0)


__all__ = ["Explainer", "BuiltinExplainer", "PromptedExplainer", "LMExplainer", "RemoteExplainer", "is_endpoint_url",
           "FeatureEvidence", "load_explainer", "describe_store",
           "DescribeStarted", "FeatureExplained", "LayerDescribed", "DescribeFinished", "DescribeEvent", "BUILTIN",
           "interpretability_from_scores"]
