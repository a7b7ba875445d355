"""Check our GPT against transformers' GPT-2 (gpt2-reproduction.md's validation pipeline).

Four checks, each a number the report keeps so the CLI and the app can show them:

1. parameter counts of both models;
2. weight parity: every tensor of the Hugging Face model against ours, with the Conv1D weights
   transposed, as a max absolute difference (conversion copies, so exact equality is expected);
3. logits on a prompt in float32: max absolute difference below 1e-4;
4. greedy generations from both (ours through :mod:`core.generation.autoregressive`, transformers' through
   ``model.generate(do_sample=False)``), identical token for token.

Only the GPT-2 family can be compared: that is the architecture our GPT reproduces.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import LOGITS_TOLERANCE, VALIDATE_GEN_PROMPT, VALIDATE_NEW_TOKENS, VALIDATE_PROMPT
from .convert import CONV1D, gpt_from_hf_gpt2, normalise_gpt2_keys
from .loading import LoadedModel, is_gptlab_folder, load_model, load_state_dict_file
from .stack import stack_for
from .statedict import config_for_spec, gpt2_tokenizer, gpt_from_state_dict, is_linear_layout
from ..devices import resolve_device
from ..errors import LabError
from ..generation.autoregressive import SamplingConfig, generate


@dataclass
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    max_abs_diff: float   # inf when the shapes differ


@dataclass
class ValidationReport:
    model: str
    device: str
    hf_params: int
    our_params: int
    weights: list[TensorDiff]
    prompt: str
    prompt_tokens: int
    logits_max_abs_diff: float
    gen_prompt: str
    max_new_tokens: int
    hf_ids: list[int]
    our_ids: list[int]
    hf_text: str
    our_text: str
    tolerance: float = LOGITS_TOLERANCE
    notes: list[str] = field(default_factory=list)

    @property
    def params_match(self) -> bool:
        return self.hf_params == self.our_params

    @property
    def weights_max_abs_diff(self) -> float:
        return max((w.max_abs_diff for w in self.weights), default=0.0)

    @property
    def weights_identical(self) -> bool:
        return bool(self.weights) and self.weights_max_abs_diff == 0.0

    @property
    def logits_pass(self) -> bool:
        return self.logits_max_abs_diff < self.tolerance

    @property
    def generations_match(self) -> bool:
        return self.hf_ids == self.our_ids

    @property
    def first_divergence(self) -> int | None:
        """Index of the first new token where the generations differ (None when identical)."""
        if self.generations_match:
            return None
        return next((i for i, (a, b) in enumerate(zip(self.hf_ids, self.our_ids)) if a != b),
                    min(len(self.hf_ids), len(self.our_ids)))

    def checks(self) -> dict[str, bool]:
        return {"parameters": self.params_match, "weights": self.weights_identical,
                "logits": self.logits_pass, "generation": self.generations_match}

    @property
    def passed(self) -> bool:
        return all(self.checks().values())

    def grouped_weights(self) -> list[tuple[str, int, float]]:
        """``(name with layers as *, tensor count, max |diff|)``: one row per kind of tensor."""
        groups: dict[str, list[float]] = {}
        for w in self.weights:
            groups.setdefault(re.sub(r"\.h\.\d+\.", ".h.*.", w.name), []).append(w.max_abs_diff)
        return [(k, len(v), max(v)) for k, v in groups.items()]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = [{"name": w.name, "shape": list(w.shape), "max_abs_diff": _finite(w.max_abs_diff)}
                        for w in self.weights]
        d.update(checks=self.checks(), passed=self.passed, weights_max_abs_diff=_finite(self.weights_max_abs_diff),
                 first_divergence=self.first_divergence)
        return d


def _finite(x: float) -> float | None:
    return None if x == float("inf") else x


# -- loading the pair ----------------------------------------------------------------------------

def _hf_from_state_dict(path: str | os.PathLike, spec: str, tokenizer: str | None):
    """A transformers GPT2LMHeadModel and our GPT from one bare state-dict file."""
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel  # a second of import: validate's own cost

    sd = normalise_gpt2_keys(load_state_dict_file(path))
    cfg, folder = config_for_spec(spec, sd)
    if not (cfg.causal and cfg.bias and cfg.mlp_expansion == 4):
        raise LabError(f"The architecture --model '{spec}' describes is not GPT-2's (causal, biases, 4x MLP); "
                       f"only GPT-2 models can be validated against transformers.")
    if folder is not None and not is_gptlab_folder(folder):
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    else:
        hf_config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model,
                               n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_eps,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_sd = {k: (v.t() if k.endswith(CONV1D) else v) for k, v in sd.items()} if is_linear_layout(sd, cfg) else sd
    hf = GPT2LMHeadModel(hf_config)
    try:
        result = hf.load_state_dict(hf_sd, strict=False)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:2])[:200]
        raise LabError(f"{path} does not fit the GPT-2 architecture --model '{spec}' describes ({detail}); "
                       f"pass the --model it belongs to.") from e
    missing = [k for k in result.missing_keys if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise LabError(f"{path} does not fit the GPT-2 architecture --model '{spec}' describes "
                       f"(first mismatch: {first}); pass the --model it belongs to.")
    hf.tie_weights()
    ours = gpt_from_state_dict(sd, cfg)
    return hf.eval(), ours, gpt2_tokenizer(tokenizer, folder, str(path))


def _hf_from_spec(spec: str, device: str, tokenizer: str | None, trust_remote_code: bool = False):
    lm = load_model(spec, device=device, dtype="float32", tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    if lm.family != "gpt2":
        what = "a GPT Lab model" if lm.family == "gptlab" else f"a {lm.family} model"
        raise LabError(f"'{spec}' is {what}; only the GPT-2 family can be validated against transformers, so pass "
                       f"gpt2, gpt2-medium, gpt2-large, gpt2-xl, a local Hugging Face GPT-2 folder, or a GPT-2 "
                       f"state dict with --weights.")
    return lm.model, gpt_from_hf_gpt2(lm.model), lm.tokenizer


# -- the checks ---------------------------------------------------------------------------------

def weight_diffs(hf_model, ours) -> list[TensorDiff]:
    """Every Hugging Face tensor against ours (Conv1D weights transposed), as max |difference|."""
    our_sd = ours.state_dict()
    out = []
    for name, theirs in normalise_gpt2_keys(hf_model.state_dict()).items():
        mine = our_sd.get(name)
        if mine is not None and name.endswith(CONV1D):
            mine = mine.t()
        if mine is None or mine.shape != theirs.shape:
            diff = float("inf")
        else:
            diff = float((theirs.detach().float() - mine.detach().float().to(theirs.device)).abs().max())
        out.append(TensorDiff(name, tuple(theirs.shape), diff))
    return out


def _encode(tok, text: str, what: str, context: int) -> list[int]:
    ids = tok.encode(text)
    if not ids:
        raise LabError(f"The {what} is empty; pass some text.")
    if len(ids) > context:
        raise LabError(f"The {what} is {len(ids)} tokens but the model's context is {context}; shorten it.")
    return ids


def validate_gpt2(spec: str = "gpt2", *, prompt: str = VALIDATE_PROMPT, gen_prompt: str = VALIDATE_GEN_PROMPT,
                  max_new_tokens: int = VALIDATE_NEW_TOKENS, weights: str | os.PathLike | None = None, device: str = "cpu",
                  tokenizer: str | None = None, log: Callable[[str], None] | None = None,
                  trust_remote_code: bool = False) -> ValidationReport:
    """Compare transformers' GPT-2 named by ``spec`` (or built from the state dict ``weights``, with
    the sizes ``spec`` implies) with our GPT holding the same weights. Runs in float32."""
    say = log or (lambda _msg: None)
    dev = resolve_device(device)
    if weights is not None and str(weights).strip().lower() == "auto":
        weights = None
    say(f"loading {weights or spec}")
    if weights is not None:
        hf, ours, tok = _hf_from_state_dict(weights, spec, tokenizer)
    else:
        hf, ours, tok = _hf_from_spec(spec, dev, tokenizer, trust_remote_code)
    hf, ours = hf.to(device=dev, dtype=torch.float32).eval(), ours.to(device=dev, dtype=torch.float32).eval()
    context = hf.config.n_positions

    say("comparing weights")
    diffs = weight_diffs(hf, ours)

    say("comparing logits")
    ids = _encode(tok, prompt, "logits prompt (--prompt)", context)
    x = torch.tensor([ids], device=dev)
    with torch.inference_mode():
        hf_logits = hf(input_ids=x).logits.float()    # (1, T, V)
        our_logits = ours(x).float()                   # (1, T, V)
    logit_diff = float((hf_logits - our_logits).abs().max())

    say(f"generating {max_new_tokens} tokens greedily with both models")
    gen_ids = _encode(tok, gen_prompt, "generation prompt (--gen-prompt)", context)
    lm = LoadedModel(spec=f"{weights or spec} (GPT Lab)", model=ours, tokenizer=tok, stack=stack_for(ours),
                     device=dev, dtype=torch.float32, source="converted from transformers")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, n_alternatives=0)
    cfg.check(context - len(gen_ids))
    result = generate(lm, gen_prompt, cfg)
    eos = tok.eos_id
    our_ids = [t.token_id for t in result.tokens] + ([eos] if result.stop_reason == "eos" else [])
    with torch.inference_mode():
        x = torch.tensor([gen_ids], device=dev)
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, eos_token_id=eos,
                          pad_token_id=eos if eos is not None else 0)
    hf_ids = out[0, len(gen_ids):].tolist()

    return ValidationReport(
        model=str(weights) if weights is not None else spec, device=dev,
        hf_params=sum(p.numel() for p in hf.parameters()), our_params=ours.num_params(), weights=diffs,
        prompt=prompt, prompt_tokens=len(ids), logits_max_abs_diff=logit_diff, gen_prompt=gen_prompt,
        max_new_tokens=max_new_tokens, hf_ids=hf_ids, our_ids=our_ids,
        hf_text=tok.decode([i for i in hf_ids if i != eos]), our_text=tok.decode([i for i in our_ids if i != eos]),
        notes=[f"weights from {Path(weights).name}, sizes from --model {spec}"] if weights is not None else [])


def format_report(r: ValidationReport) -> str:
    """The report as text, in gpt2-reproduction.md's order."""
    ok = {True: "pass", False: "FAIL"}
    lines = [f"Validating {r.model} against transformers (float32 on {r.device})", *(f"  {n}" for n in r.notes), "",
             "Parameters",
             f"  transformers GPT2LMHeadModel  {r.hf_params:>15,}",
             f"  GPT Lab GPT                   {r.our_params:>15,}   {ok[r.params_match]}", "",
             f"Weights ({len(r.weights)} tensors, Conv1D weights transposed; max |diff|)"]
    width = max((len(n) for n, _, _ in r.grouped_weights()), default=10)
    for name, n, diff in r.grouped_weights():
        lines.append(f"  {name:<{width}}  x{n:<3} {diff:.3g}")
    lines += [f"  all identical: {'yes' if r.weights_identical else 'no'}   {ok[r.weights_identical]}", "",
              f"Logits on {r.prompt!r} ({r.prompt_tokens} tokens)",
              f"  max |diff| {r.logits_max_abs_diff:.3g} (tolerance {r.tolerance:g})   {ok[r.logits_pass]}", "",
              f"Greedy generation, up to {r.max_new_tokens} new tokens after {r.gen_prompt!r}",
              f"  transformers: {r.hf_text!r}",
              f"  GPT Lab:      {r.our_text!r}"]
    if r.generations_match:
        lines.append(f"  identical token for token ({len(r.our_ids)} tokens)   pass")
    else:
        i = r.first_divergence
        a = r.hf_ids[i] if i < len(r.hf_ids) else "end"
        b = r.our_ids[i] if i < len(r.our_ids) else "end"
        lines.append(f"  differ from new token {i} (transformers {a}, GPT Lab {b})   FAIL")
    failed = [k for k, v in r.checks().items() if not v]
    lines += ["", "Result: all checks pass" if not failed else f"Result: FAILED ({', '.join(failed)})"]
    return "\n".join(lines)
