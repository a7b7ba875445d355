"""Explainers: turn a feature's evidence into words, layers' features into a layer description,
layers into a total description, and rate a completion and an interpretation from 1 to 10.

Three explainers, one interface (:class:`Explainer`):

- :class:`BuiltinExplainer` (``builtin``, the offline default) needs no model. It writes
  sentences from the evidence: the tokens a feature fires on (in double quotes, weighted by
  activation, with the share of its strongest activations they cover), the contexts it fires in
  (the token that usually precedes, the place in the line, speaker names and the first line of a
  speech), and the tokens it promotes (in single quotes). Double quotes are reserved for tokens
  it fires on: that is what the rule-based detector and simulator read when scoring, so its
  scores measure exactly the rule it wrote down, and say "rule". It grades no text: a completion's
  quality is the model's perplexity on it.
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
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, Union

import torch

from ..errors import LabError, ModelNotAvailableError, first_line, shorten
from ..models.loading import hub_reachable, offline_message
from .config import DESCRIBE_BATCH, DESCRIBE_N_TOP, SIM_SCALE, SIM_WINDOWS
from .prompts import (FALLBACK_MAX_INPUT, clean_token, feature_prompt, interpretation_rating_prompt, layer_prompt,
                      output_rating_prompt, parse_explanation, parse_score, parse_yes_no, total_prompt)
from .scoring import (GOOD_AUC, Detector, LMDetector, LMSimulator, RuleDetector, RuleSimulator, Simulator,
                      check_methods, interpretability_from_scores, quoted_tokens, score_feature)
from .store import Context, FeatureStore, Score

if TYPE_CHECKING:
    from ..serve.client import Endpoint

BUILTIN = "builtin"
YES_NO_ALTERNATIVES = 20   # top log-probabilities asked for a yes/no answer (the OpenAI API's maximum)
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

    def describe_layer(self, layer: int, items: Sequence[LayerItem]) -> str:
        """``items``: ``(feature explanation, weight, its detection AUC or None)``, most important first."""
        raise NotImplementedError

    def describe_completion_layer(self, layer: int, cited: Sequence["Cited"]) -> str:
        """What a layer's features did on one completion: ``cited`` features, ranked by attribution,
        each with the tokens of the completion it fired on."""
        return self.describe_layer(layer, [(c.line(), c.attribution, c.score) for c in cited])

    def judges_text(self) -> bool:
        """Whether :meth:`rate_output` grades a completion (a language model) rather than nothing."""
        return False

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


LayerItem = Union[tuple[str, float], tuple[str, float, Union[float, None]],
                  tuple[str, float, Union[float, None], int]]   # (explanation, weight, detection AUC, its n)


@dataclass
class Cited:
    """A feature an explained completion cites: the tokens of the text it fired on (by attribution)."""

    feature: int
    tokens: list[str]               # as they occur in the prompt + completion, strongest first
    attribution: float
    explanation: str | None
    score: float | None = None      # held-out detection AUC of the explanation

    def line(self) -> str:
        where = ", ".join(_tok(t) for t in dict.fromkeys(self.tokens)) or "-"
        return f"feature {self.feature} fired on {where} ({self.attribution:+.3g}): {self.explanation or 'unexplained'}"


def _tok(text: str) -> str:
    """A token of a completion as a description cites it: «text», whitespace made visible."""
    return f"«{clean_token(text)}»"


def _item(it: LayerItem) -> tuple[str, float, float | None]:
    return (it[0], it[1], it[2] if len(it) > 2 else None)  # type: ignore[misc]


def _auc_text(it: LayerItem) -> str:
    """``detection AUC 0.88, n=125`` (the n when the item carries it)."""
    n = it[3] if len(it) > 3 else None  # type: ignore[misc]
    return f"detection AUC {it[2]:.2f}" + (f", n={n}" if n else "")  # type: ignore[misc]


# -- built-in ---------------------------------------------------------------------------------

def _q(tokens: Sequence[str], quote: str = '"') -> str:
    return ", ".join(f"{quote}{t}{quote}" for t in tokens)


def _shown(text: str) -> str:
    return clean_token(text).strip()


class BuiltinExplainer(Explainer):
    """Sentences from the evidence; deterministic, no model (see the module docstring)."""

    name = BUILTIN

    def __init__(self, max_tokens: int = 4, mass_share: float = 0.8, context_share: float = 0.5):
        self.max_tokens, self.mass_share, self.context_share = max_tokens, mass_share, context_share

    def explain_features(self, evidence: Sequence[FeatureEvidence]) -> list[str]:
        return [self._one(ev) for ev in evidence]

    def _one(self, ev: FeatureEvidence) -> str:
        mass: Counter[str] = Counter()
        for c in ev.top:
            tok = _shown(c.tokens[c.position])
            if tok:
                mass[tok] += max(c.activation, 0.0)
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
        if fires:
            head = f"Fires on {_q(fires)}"
            if ev.top and total > 0 and acc < total:
                head += f" ({acc / total:.0%} of its strongest activations)"
        else:
            head = "Fires on whitespace or formatting tokens"
        where = self._contexts(ev.top)
        text = head + (", " + ", ".join(where) if where else "") + "."
        promoted = [_shown(t) for t, _ in ev.promoted if _shown(t) and "\ufffd" not in t][:3]
        if promoted:
            text += f" It makes the model more likely to write {_q(promoted, quote=chr(39))}."
        return text

    def _contexts(self, top: Sequence[Context]) -> list[str]:
        """The context clauses that hold for at least ``context_share`` of the top windows."""
        if not top:
            return []
        n = len(top)
        need = max(2, math.ceil(self.context_share * n)) if n > 1 else 1
        before: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for c in top:
            line, prev_line, line_known = _lines(c)
            if c.position > 0 and _shown(c.tokens[c.position - 1]):
                before[_shown(c.tokens[c.position - 1])] += 1
            if line_known and not "".join(line).strip():
                counts["line start"] += 1
            after = c.tokens[c.position + 1] if c.position + 1 < len(c.tokens) else None
            if after is not None and after.lstrip(" \t").startswith("\n"):
                counts["line end"] += 1
            if line_known and "".join(line).lstrip().startswith("["):
                counts["stage"] += 1
            if _is_speaker(line + [c.tokens[c.position]] + _rest_of_line(c)):
                counts["speaker"] += 1
            elif prev_line is not None and _is_speaker(prev_line):
                counts["speech start"] += 1
        out = []
        if before:
            prev, k = before.most_common(1)[0]
            if k >= need:
                out.append(f"mostly right after '{prev}'")
        if counts["line start"] >= need:
            out.append("at the start of a line")
        elif counts["line end"] >= need:
            out.append("at the end of a line")
        if counts["speaker"] >= need:
            out.append("in speakers' names (the upper-case lines that open a speech)")
        elif counts["speech start"] >= need:
            out.append("in the first line of a speech, right after the speaker's name")
        elif counts["stage"] >= need:
            out.append("in stage directions (lines in square brackets)")
        return out

    def describe_layer(self, layer: int, items: Sequence[LayerItem]) -> str:
        """The layer's most active features whose explanations hold up on held-out text (detection AUC
        at least :data:`GOOD_AUC`), most active first, each with its AUC; without scores, the most active."""
        rows = [_item(it) for it in items]
        scored = any(score is not None for _, _, score in rows)
        good = [(r, it) for r, it in zip(rows, items) if not scored or (r[2] is not None and r[2] >= GOOD_AUC)]
        parts = []
        for (text, _, score), it in good[:4]:
            gist = _gist(text)
            if gist:
                parts.append(gist + (f" ({_auc_text(it)})" if score is not None else ""))
        if not scored:
            if not parts:
                return f"Layer {layer}: no readable features among the {len(rows)} most important."
            return f"Layer {layer}'s most active features fire " + "; ".join(parts) + "."
        if not parts:
            best = max(items, key=lambda it: _item(it)[2] if _item(it)[2] is not None else -1.0, default=None)
            tail = f"; the best fires {_gist(best[0])} ({_auc_text(best)})" if best and _item(best)[2] is not None \
                and _gist(best[0]) else ""
            return (f"Layer {layer}: none of its {len(rows)} most active features has an explanation that holds up "
                    f"on held-out text (detection AUC {GOOD_AUC} or more){tail}.")
        has = "has an explanation that holds" if len(good) == 1 else "have explanations that hold"
        return (f"Layer {layer}: of its {len(rows)} most active features, {len(good)} {has} up on held-out text "
                f"(detection AUC {GOOD_AUC} or more), firing " + "; ".join(parts) + ".")

    def describe_completion_layer(self, layer: int, cited: Sequence[Cited]) -> str:
        shown = [c for c in cited if c.tokens]
        if not shown:
            return f"Layer {layer}: none of its top features fired on this text."
        parts = []
        for c in shown[:3]:
            gist = _gist(c.explanation) if c.explanation else None
            what = f"; it fires {gist}" if gist else ""
            seen = list(dict.fromkeys(c.tokens))[:3]  # each token once, strongest first
            parts.append(f"feature {c.feature} on {', '.join(_tok(t) for t in seen)} "
                         f"({c.attribution:+.2g}{what})")
        return f"Layer {layer}: " + "; then ".join(parts) + "."

    def describe_total(self, layer_descriptions: Sequence[tuple[int, str]], prompt: str | None = None,
                       completion: str | None = None) -> str:
        if completion is not None:
            parts = [d.split(": ", 1)[1] if ": " in d else d for _, d in layer_descriptions]
            ranked = [f"layer {l}: {p.split('; then ')[0].rstrip('.')}" for (l, _), p in zip(layer_descriptions, parts)
                      if not p.startswith("none of")]
            if not ranked:
                return "No transcoder feature fired on this text."
            return "Most of the completion came from " + "; ".join(ranked[:3]) + "."
        parts = []
        for layer, text in layer_descriptions:
            toks = [] if ": none of its" in text else list(dict.fromkeys(quoted_tokens(text)))[:3]
            parts.append(f"layer {layer} on {_q(toks)}" if toks else f"layer {layer}: none that holds up")
        return "By layer, the most active features whose explanations hold up fire: " + "; ".join(parts) + "."

    def rate_output(self, prompt: str, completion: str, mean_logprob: float | None = None) -> int | None:
        """None: the built-in explainer grades no text (the page shows the model's perplexity)."""
        return None

    def rate_interpretation(self, prompt: str, completion: str, description: str,
                            measured: int | None = None) -> int | None:
        """The measured score (detection accuracy of the features used, mapped to 1-10)."""
        return measured

    def detector(self) -> Detector:
        return RuleDetector()

    def simulator(self) -> Simulator | None:
        return RuleSimulator()


def _gist(text: str | None) -> str | None:
    """An explanation's first sentence as a clause: 'on "x" at the start of a line'."""
    if not text:
        return None
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].rstrip(".")
    first = re.sub(r"\s*\(\d+% of its strongest activations\)", "", first)
    first = re.sub(r"^(fires|it fires|the neuron fires|detects)\s+", "", first, flags=re.IGNORECASE)
    return first or None


def _lines(c: Context) -> tuple[list[str], list[str] | None, bool]:
    """``(tokens of the activation's line before it, the previous line's tokens or None, whether the
    line's start is inside the window)``."""
    toks = c.tokens[:c.position]
    breaks = [i for i, t in enumerate(toks) if "\n" in t]
    if not breaks:
        return toks, None, False
    last = breaks[-1]
    line = [toks[last].rsplit("\n", 1)[1]] + toks[last + 1:]
    if len(breaks) >= 2:
        prev = [toks[breaks[-2]].rsplit("\n", 1)[1]] + toks[breaks[-2] + 1:last] + [toks[last].split("\n", 1)[0]]
        if "".join(prev).strip():
            return line, prev, True
    return line, None, True


def _rest_of_line(c: Context) -> list[str]:
    out = []
    for t in c.tokens[c.position + 1:]:
        if "\n" in t:
            out.append(t.split("\n", 1)[0])
            break
        out.append(t)
    return out


def _is_speaker(tokens: Sequence[str]) -> bool:
    """A line that is a speaker's name: upper-case letters (and spaces), perhaps ending in '.' or ':'."""
    text = "".join(tokens).strip().rstrip(".:")
    return len(text) >= 2 and any(ch.isalpha() for ch in text) and text.upper() == text and \
        all(ch.isalpha() or ch in " '-" for ch in text)


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

    def yes_probability(self, prompts: Sequence[str]) -> list[float]:
        """Per prompt: P("yes") / (P("yes") + P("no")) for the answer's first token (0 or 1 when only
        the answer's text can be read)."""
        raise NotImplementedError

    def yes_no(self, prompts: Sequence[str]) -> list[bool]:
        """Per prompt: is "yes" likelier than "no" as the answer?"""
        return [p > 0.5 for p in self.yes_probability(prompts)]

    def prompt_budget(self, answer_tokens: int) -> int:
        """Prompt tokens left when the answer may take ``answer_tokens`` (a causal model's or a
        server's answer shares the context with its prompt; a seq2seq model overrides this)."""
        return self.max_input + self.max_new_tokens - answer_tokens

    def answers_with_logprobs(self, prompts: Sequence[str], max_new_tokens: int) -> list[tuple[str, list | None]]:
        """Greedy answers, each with its tokens as ``(text, logprob, alternatives)`` steps
        (:data:`core.interp.prompts.Step`) where the model gives them, else None."""
        raise NotImplementedError

    def explain_features(self, evidence: Sequence[FeatureEvidence]) -> list[str]:
        prompts = [feature_prompt(ev.top, self.count, self.max_input, [clean_token(t) for t, _ in ev.promoted])[0]
                   for ev in evidence]
        return [parse_explanation(a) or "(no answer)" for a in self.generate(prompts)]

    def describe_layer(self, layer: int, items: Sequence[LayerItem]) -> str:
        answer = self.generate([layer_prompt(layer, [_item(t)[0] for t in items], self.count, self.max_input)])[0]
        return parse_explanation(answer) or "(no answer)"

    def describe_total(self, layer_descriptions: Sequence[tuple[int, str]], prompt: str | None = None,
                       completion: str | None = None) -> str:
        answer = self.generate([total_prompt(layer_descriptions, self.count, self.max_input, prompt, completion)])[0]
        return parse_explanation(answer) or "(no answer)"

    def rate_output(self, prompt: str, completion: str, mean_logprob: float | None = None) -> int | None:
        return parse_score(self.generate([output_rating_prompt(prompt, completion)], 6)[0])

    def judges_text(self) -> bool:
        return True

    def rate_interpretation(self, prompt: str, completion: str, description: str,
                            measured: int | None = None) -> int | None:
        return parse_score(self.generate([interpretation_rating_prompt(prompt, completion, description)], 6)[0])

    def detector(self) -> Detector:
        return LMDetector(self)

    def simulator(self) -> Simulator | None:
        return LMSimulator(self)


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
        self.context_limit = limit
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

    def prompt_budget(self, answer_tokens: int) -> int:
        if self.seq2seq:  # the answer is the decoder's: the encoder's whole input is the prompt's
            return self.max_input
        return getattr(self, "context_limit", self.max_input + self.max_new_tokens) - answer_tokens

    def _digit_ids(self) -> dict[int, str]:
        """The single tokens that are a number 0..SIM_SCALE (with or without a leading space): id -> text."""
        if not hasattr(self, "_digits"):
            found: dict[int, str] = {}
            for v in range(SIM_SCALE + 1):
                for text in (str(v), " " + str(v)):
                    ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    if len(ids) == 1:
                        found[int(ids[0])] = self.tokenizer.decode(ids)
            self._digits = found
        return self._digits

    def answers_with_logprobs(self, prompts: Sequence[str], max_new_tokens: int) -> list[tuple[str, list | None]]:
        """Greedy answers, batched, each with every answer token's log-probability and, as its
        alternatives, the log-probabilities of the number tokens 0..SIM_SCALE (what a simulation's
        expected values need), read from the logits; the tokens' texts are the answer's decoded
        prefixes, so they spell the answer exactly (steps are None where a tokenizer's decoding
        does not grow by prefixes)."""
        digits = self._digit_ids()
        cand = torch.tensor(sorted(digits), dtype=torch.long, device=self.device)
        cand_text = [digits[int(i)] for i in cand.tolist()]
        stop = {i for i in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if i is not None}
        out: list[tuple[str, list | None]] = []
        for s in range(0, len(prompts), self.batch_size):
            batch = list(prompts[s:s + self.batch_size])
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                 max_length=max(1, self.prompt_budget(max_new_tokens))).to(self.device)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                          pad_token_id=self.tokenizer.pad_token_id, output_logits=True,
                                          return_dict_in_generate=True)
            seqs = gen.sequences[:, 1:] if self.seq2seq else gen.sequences[:, enc["input_ids"].shape[1]:]
            chosen_lp, cand_lp = [], []
            for k, step_logits in enumerate(gen.logits):                         # one (b, V) per answer token
                lp = step_logits.float().log_softmax(-1)
                chosen_lp.append(lp.gather(1, seqs[:, k:k + 1]).squeeze(1).cpu())
                cand_lp.append(lp[:, cand].cpu() if len(cand) else torch.zeros(lp.shape[0], 0))
            chosen = torch.stack(chosen_lp, 1) if chosen_lp else torch.zeros(len(batch), 0)   # (b, steps)
            alts = torch.stack(cand_lp, 1) if cand_lp else torch.zeros(len(batch), 0, 0)      # (b, steps, C)
            for b in range(len(batch)):
                ids = seqs[b].tolist()[:chosen.shape[1]]
                end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
                text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
                steps: list | None = []
                prev = ""
                for k in range(end):
                    cur = self.tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
                    if not cur.startswith(prev):
                        steps = None
                        break
                    steps.append((cur[len(prev):], float(chosen[b, k]),
                                  list(zip(cand_text, alts[b, k].tolist()))))
                    prev = cur
                if steps is not None and prev != text:
                    steps = None
                out.append((text, steps))
        return out

    def _answer_ids(self, word: str) -> int | None:
        for text in ((word,) if self.seq2seq else (" " + word, word)):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                return int(ids[0])
        return None

    def yes_probability(self, prompts: Sequence[str]) -> list[float]:
        """P("yes") against "no" as the first answer token, from the logits, batched."""
        yes, no = self._answer_ids("yes"), self._answer_ids("no")
        if yes is None or no is None or yes == no:  # the tokenizer cannot tell them apart: read the text
            return [float(parse_yes_no(a) is True) for a in self.generate(prompts, 3)]
        out: list[float] = []
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
            pair = torch.stack([logits[:, yes], logits[:, no]], -1).float()
            out.extend(pair.softmax(-1)[:, 0].tolist())
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

    def answers_with_logprobs(self, prompts: Sequence[str], max_new_tokens: int) -> list[tuple[str, list | None]]:
        """Greedy answers with every token's top :data:`YES_NO_ALTERNATIVES` log-probabilities, where
        the server gives them (steps None otherwise: the simulation then reads the written numbers)."""
        def one(prompt: str) -> tuple[str, list | None]:
            answer = self.endpoint.ask(prompt, max_new_tokens, top_logprobs=YES_NO_ALTERNATIVES)
            return answer.text, answer.steps
        return self.endpoint.map(one, list(prompts))

    def yes_probability(self, prompts: Sequence[str]) -> list[float]:
        return self.endpoint.map(self._yes_probability, list(prompts))

    def _yes_probability(self, prompt: str) -> float:
        """From the answer's top log-probabilities ("yes" and "no" in any case or spacing); a word
        missing from the top list counts as less likely than the least likely listed; from the
        answer's text when the server gives no log-probabilities."""
        answer = self.endpoint.ask(prompt, 3, top_logprobs=YES_NO_ALTERNATIVES)
        if answer.top:
            floor = min(answer.top.values()) - 1.0

            def best(word: str) -> float | None:
                got = [lp for tok, lp in answer.top.items() if tok.strip().lower() == word]
                return max(got) if got else None
            yes, no = best("yes"), best("no")
            if yes is not None or no is not None:
                y, n = (floor if yes is None else yes), (floor if no is None else no)
                return 1.0 / (1.0 + math.exp(n - y))
        return float(parse_yes_no(answer.text) is True)


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
    mean_score: float | None            # mean detection AUC of the layer's explained features


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
                   batch_size: int | None = None, methods: Sequence[str] | None = None, n_sim: int | None = None,
                   layer_items: int = 30, set_id: int | None = None) -> Iterator[DescribeEvent]:
    """Explain (and score) the live features of ``layers`` (all by default), most frequent first,
    at most ``max_features`` per layer; then describe each layer from its ``layer_items`` most
    active explained features (density x mean activation) and the whole set from the layers.
    Each batch is committed once its explanations and scores are all in hand, so a stopped run keeps
    the batches it finished and a failed explainer call (a server gone, a refused key) writes
    nothing of its batch: the store never holds an explanation without its score.

    ``methods`` (default all of :data:`core.interp.config.SCORE_METHODS`) picks the scores;
    simulation is scored on ``n_sim`` firing and ``n_sim`` silent held-out windows (default
    :data:`~core.interp.config.SIM_WINDOWS`: every one for the built-in rule simulator, 10 + 10 for
    a language model, which costs one call per window)."""
    explainer = explainer or BuiltinExplainer()
    kind = "builtin" if isinstance(explainer, BuiltinExplainer) else "lm"
    batch_size = batch_size or DESCRIBE_BATCH[kind]
    methods = check_methods(methods)
    n_sim = SIM_WINDOWS[kind] if n_sim is None else n_sim
    if n_sim is not None and n_sim < 1:
        raise LabError(f"--n-sim must be at least 1 window (got {n_sim}).")
    info = store.layers(set_id)
    all_layers = [l.layer for l in info]
    layers = all_layers if layers is None else [l for l in layers if l in all_layers]
    if not layers:
        raise LabError(f"The store has no such layer; it holds layers {all_layers}.")
    todo = {l: store.features(l, order_by="density", limit=max_features, set_id=set_id) for l in layers}
    total = sum(len(v) for v in todo.values())
    detector = explainer.detector() if score else None
    simulator = explainer.simulator() if score and "simulation" in methods else None
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
                got = score_feature(store, layer, f.feature, t, detector, simulator, set_id, methods=methods,
                                    n_sim=n_sim) if score else []
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
        scored = {f.feature: store.scores(layer, f.feature, set_id).get(explainer.name, {}).get("detection")
                  for f in ranked} if score else {}
        items = [(exps[f.feature], f.density * f.mean_act, *((scored[f.feature].value, scored[f.feature].n)
                                                             if scored.get(f.feature) else (None,)))
                 for f in ranked if f.feature in exps]
        layer_text[layer] = explainer.describe_layer(layer, items)
        store.put_description("layer", layer, explainer.name, layer_text[layer], set_id)
        mean_scores[layer] = sum(det_values) / len(det_values) if det_values else None
        yield LayerDescribed(layer=layer, text=layer_text[layer], mean_score=mean_scores[layer])
    total_text = explainer.describe_total(sorted(layer_text.items()))
    store.put_description("total", -1, explainer.name, total_text, set_id)
    yield DescribeFinished(explainer=explainer.name, total_description=total_text, layer_descriptions=layer_text,
                           mean_scores=mean_scores, seconds=time.perf_counter() - t0)


__all__ = ["Explainer", "BuiltinExplainer", "PromptedExplainer", "LMExplainer", "RemoteExplainer", "is_endpoint_url",
           "FeatureEvidence", "Cited", "load_explainer", "describe_store",
           "DescribeStarted", "FeatureExplained", "LayerDescribed", "DescribeFinished", "DescribeEvent", "BUILTIN",
           "interpretability_from_scores"]
