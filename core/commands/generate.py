"""Greedy decoding, sampling (temperature, top-k, top-p, min-p, repetition penalty) or beam search
from any model spec. The prompt and completion go to stdout; notes and the timing line to stderr.

Examples:
  python -m core generate --model gpt2 --prompt "The three laws of robotics are:" --greedy
  python -m core generate --prompt "ROMEO:" --temperature 0.8 --top-p 0.95 --stream --seed 1
  python -m core generate --ckpt runs/shakespeare --prompt "To be" --strategy topk --logprobs
  echo "Once upon a time" | python -m core generate --max-new-tokens 20

Diffusion models (checkpoints whose config.json says "objective": "diffusion") are decoded by the
masked-diffusion sampler instead: the completion starts as --gen-length masks and --diffusion-steps
steps reveal them (--unmask confidence|random), in blocks of --block-length tokens left to right
when given; --temperature (default 0 there: the most likely token), --top-k, --top-p, --min-p and
--seed keep their meaning, and draws are float64 (--gumbel-dtype). --stream prints every denoising
state on its own line (masks as ░, newlines as ↵) and --json keeps every state. --gen-ppl [SPEC]
reports the completion's generative perplexity under an autoregressive model (the shipped default
unless named), over --gen-ppl-samples samples.
  python -m core generate --ckpt runs/diffusion --prompt "ROMEO:" --gen-length 64 --diffusion-steps 32 --stream
  python -m core generate --ckpt runs/diffusion --prompt "ROMEO:" --temperature 1 --block-length 16 --gen-ppl

diffusion-interpretability's generate.py flags work as written: --train_folder RUN --checkpoint_name
state_step020000.pt loads RUN/checkpoints/20000, --cuda N is --device cuda:N, and --num_layers,
--num_heads, --model_dim and --max_seq_len must match the checkpoint's config (it carries its sizes).
  python -m core generate --train_folder runs/diffusion --checkpoint_name state_step020000.pt --cuda 1 \\
      --num_layers 12 --num_heads 6 --model_dim 384 --max_seq_len 4096 --prompt "Once upon a time," --stream

gpt2-reproduction's default: with no --model (and no --weights/--ckpt), data/gpt2_weights.pt in the
working folder is loaded when it exists, as its scripts did; a note says so, and --weights auto or
any --model loads something else.

One rule for flags the model's sampler has no use for (--repetition-penalty, --num-beams, --stop,
--logprobs... on a diffusion model; the diffusion flags on an autoregressive one): they are named in
a one-line note on stderr and ignored, never an error.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Callable, TextIO

from .cli import add_model_args, float_arg, int_arg, load_from_args, path_arg, read_stdin, use_reference_weights
from ..errors import LabError, shorten
from ..files import atomic_write_json, check_output
from ..generation.config import (DEFAULT_SCORER, GUMBEL_DTYPES, MAX_SCORED_SAMPLES, STRATEGIES, DiffusionConfig,
                                 SamplingConfig, draw_seed)
from ..interventions.flags import add_intervention_args, interventions_from_args

NAME = "generate"
HELP = ("Continue a prompt with any model: greedy, sampling or beam search; stream tokens, show probabilities; "
        "diffusion models denoise step by step.")

STRATEGY_TOP_K = 50    # --strategy topk without --top-k (the reference generate.py's default)
STRATEGY_TOP_P = 0.9   # --strategy topp without --top-p
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p")
DIFFUSION_FLAGS = ("gen_length", "diffusion_steps", "unmask", "block_length", "gumbel_dtype", "no_cache", "gen_ppl",
                   "gen_ppl_samples")
MASK_GLYPH = "\u2591"  # one light shade block per masked token in --stream lines
S, D = SamplingConfig, DiffusionConfig  # every flag's default is read from these, never restated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    g = parser.add_argument_group("prompt and output")
    g.add_argument("--prompt", help="the text to continue (default: read from stdin)")
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int_arg(1),
                   default=S.max_new_tokens, metavar="K", help="(default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the completion contains STR (repeatable); the completion ends before it")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--logprobs", action="store_true",
                   help="print each token's log-probability and the most likely alternatives")
    g.add_argument("--alternatives", type=int_arg(0), default=S.n_alternatives, metavar="N",
                   help="alternatives per token for --logprobs and --json (default: %(default)s)")
    g.add_argument("--perplexity", action="store_true", help="print the prompt's perplexity under the model")
    g.add_argument("--json", metavar="FILE", type=path_arg, help="write the full result (tokens, probabilities, settings) as JSON")

    d = parser.add_argument_group(f"decoding (default: sampling at temperature {S.temperature:g})")
    d.add_argument("--greedy", action="store_true", help="always take the most likely token")
    d.add_argument("--strategy", choices=("greedy", "topk", "topp"),
                   help=f"reference spelling: greedy = --greedy; topk = sampling with --top-k "
                        f"(default {STRATEGY_TOP_K}); topp = sampling with --top-p (default {STRATEGY_TOP_P})")
    # Impossible values fail while parsing; --temperature 0 is fine for a diffusion model, so an
    # autoregressive model's "above 0" is checked once the model is known (sampling_config).
    d.add_argument("--temperature", type=float_arg(0), metavar="T",
                   help=f"divide logits by T (default {S.temperature:g}; {D.temperature:g} for diffusion models)")
    d.add_argument("--top-k", "--top_k", dest="top_k", type=int_arg(0, note="; 0 turns it off"), metavar="K",
                   help="sample among the K most likely tokens (0 = off)")
    d.add_argument("--top-p", "--top_p", dest="top_p", metavar="P",
                   type=float_arg(0, 1, low_open=True, note="; 1 turns it off"),
                   help="sample from the smallest set of tokens holding probability P (1 = off)")
    d.add_argument("--min-p", "--min_p", dest="min_p", metavar="P",
                   type=float_arg(0, 1, high_open=True, note="; 0 turns it off"),
                   help="drop tokens below P times the top token's probability (0 = off)")
    d.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty",
                   type=float_arg(0, low_open=True, note="; 1 turns it off"),
                   metavar="R", help="make already-seen tokens less likely (>1; default 1 = off)")
    d.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int_arg(1), default=S.num_beams, metavar="N",
                   help="beam search with N beams (deterministic; sampling flags are ignored)")
    d.add_argument("--length-penalty", dest="length_penalty", type=float_arg(), default=S.length_penalty,
                   metavar="L", help="beam scores are sum(logprob) / length**L (default: %(default)s)")
    d.add_argument("--seed", type=int, metavar="S", help="seed for sampling (default: a fresh one, printed)")

    add_intervention_args(parser)
    m = parser.add_argument_group(
        "diffusion models (objective: diffusion)",
        f"  --temperature (default {D.temperature:g} here: the most likely token), --top-k, --top-p,\n"
        "  --min-p and --seed apply too; --greedy means temperature 0. Flags the diffusion sampler has no\n"
        "  use for are named in a one-line note and ignored.")
    m.add_argument("--gen-length", "--gen_length", dest="gen_length", type=int, metavar="N",
                   help="tokens to generate after the prompt (default: --max-new-tokens)")
    m.add_argument("--diffusion-steps", "--diffusion_steps", dest="diffusion_steps", type=int_arg(1), metavar="N",
                   help=f"denoising steps; each reveals about gen-length/N tokens (default {D.steps}); "
                        f"beyond the generation length some steps reveal nothing")
    m.add_argument("--unmask", choices=STRATEGIES,
                   help=f"which masked positions each step reveals: the most confident predictions, or random "
                        f"ones (default {D.strategy})")
    m.add_argument("--block-length", "--block_length", dest="block_length", type=int_arg(0), metavar="N",
                   help=f"semi-autoregressive decoding (LLaDA): blocks of N tokens, left to right, each finished "
                        f"before the next; the steps are shared between blocks (default {D.block_length}: one block)")
    m.add_argument("--gumbel-dtype", dest="gumbel_dtype", choices=GUMBEL_DTYPES,
                   help=f"precision of the sampling draws with --temperature above 0; float32 under-samples "
                        f"unlikely tokens (default {D.gumbel_dtype})")
    m.add_argument("--no-cache", dest="no_cache", action="store_const", const=True,
                   help="run the model at every step, even one that reveals nothing (more steps than tokens); "
                        "the text is the same, only slower")
    m.add_argument("--gen-ppl", dest="gen_ppl", nargs="?", const=DEFAULT_SCORER, metavar="SPEC", type=path_arg,
                   help=f"report the generative perplexity of the completion(s) under the autoregressive model "
                        f"SPEC (without SPEC: {DEFAULT_SCORER!r}, the shipped model)")
    m.add_argument("--gen-ppl-samples", dest="gen_ppl_samples", type=int_arg(1, MAX_SCORED_SAMPLES), metavar="N",
                   help="with --gen-ppl: draw N samples (seeds S, S+1, ...) and score them all (default 1)")


def _given(**values) -> dict:
    """The settings a user typed: ``None`` means "the config's default", so it is left out."""
    return {k: v for k, v in values.items() if v is not None}


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The :class:`SamplingConfig` the flags describe (aliases resolved), checked."""
    if args.greedy and args.strategy in ("topk", "topp"):
        raise LabError(f"--greedy contradicts --strategy {args.strategy}; drop one of them.")
    top_k, top_p = args.top_k, args.top_p
    if args.strategy == "topk" and top_k is None:
        top_k = STRATEGY_TOP_K
    if args.strategy == "topp" and top_p is None:
        top_p = STRATEGY_TOP_P
    if args.temperature == 0 and not (args.greedy or args.strategy == "greedy" or args.num_beams > 1):
        raise LabError("--temperature must be above 0 for sampling (got 0); pass --greedy for the most likely token.")
    cfg = SamplingConfig(**_given(
        max_new_tokens=args.max_new_tokens, greedy=bool(args.greedy or args.strategy == "greedy"),
        temperature=args.temperature, top_k=top_k, top_p=top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, stop=list(args.stop or []), seed=args.seed,
        num_beams=args.num_beams, length_penalty=args.length_penalty, n_alternatives=args.alternatives))
    cfg.check()
    return cfg


def ignored_flags(args: argparse.Namespace, cfg: SamplingConfig) -> list[str]:
    """Sampling flags that greedy decoding or beam search will not use (for a note, not an error)."""
    if not (cfg.greedy or cfg.num_beams > 1):
        return []
    return ["--" + f.replace("_", "-") for f in SAMPLING_FLAGS if getattr(args, f) is not None]


def read_prompt(prompt: str | None, stdin: TextIO | None = None) -> str:
    """``--prompt``, or all of stdin (one trailing newline dropped) when it is not given."""
    if prompt is None:
        prompt = read_stdin("the prompt", stdin)
        if prompt is None:
            raise LabError("No prompt: pass --prompt TEXT or pipe text on stdin.")
        if prompt.endswith("\n"):
            prompt = prompt[:-1]
    if not prompt.strip():
        raise LabError("The prompt is empty; pass --prompt TEXT or pipe text on stdin.")
    return prompt


class StreamPrinter:
    """Prints a growing completion without taking text back: the tail that could still change (an
    unfinished UTF-8 character, or the start of a stop string) is held until it has settled."""

    def __init__(self, out: TextIO, hold: int):
        self.out, self.hold, self.shown = out, hold, ""

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.shown += text

    def update(self, completion: str) -> None:
        safe = completion[:max(0, len(completion) - self.hold)].rstrip("\ufffd")
        if len(safe) > len(self.shown) and safe.startswith(self.shown):
            self._write(safe[len(self.shown):])

    def finish(self, completion: str) -> None:
        if completion.startswith(self.shown):
            self._write(completion[len(self.shown):])


def _pct(p: float) -> str:
    return f"{p:.1%}" if p >= 0.001 else f"{p:.1e}"


def format_logprobs(tokens) -> str:
    """A table of the generated tokens: log-probability, probability and the top alternatives."""
    rows = [f"{'#':>4}  {'token':<18} {'logprob':>9} {'prob':>7}  alternatives (prob)"]
    for t in tokens:
        alts = " | ".join(f"{s!r} {_pct(p)}" for _, s, p in t.alternatives)
        rows.append(f"{t.index:>4}  {t.text!r:<18} {t.logprob:>9.4f} {_pct(t.prob):>7}  {alts}")
    return "\n".join(rows)


def diffusion_config(args: argparse.Namespace) -> DiffusionConfig:
    """The :class:`DiffusionConfig` the flags describe. ``--greedy`` (or ``--strategy greedy``)
    is temperature 0, which is also the default here."""
    greedy = args.greedy or args.strategy == "greedy"
    if args.gen_length is not None and args.gen_length < 1:  # an autoregressive model ignores it, so not at parsing
        raise LabError(f"The generation length must be at least 1 (got {args.gen_length}); raise --gen-length.")
    return DiffusionConfig(**_given(
        gen_length=args.max_new_tokens if args.gen_length is None else args.gen_length, steps=args.diffusion_steps,
        strategy=args.unmask, temperature=0.0 if greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, block_length=args.block_length, gumbel_dtype=args.gumbel_dtype,
        cache=None if args.no_cache is None else not args.no_cache, seed=args.seed))


def diffusion_ignored_flags(args: argparse.Namespace, cfg: DiffusionConfig) -> list[str]:
    """Flags given on the command line that the diffusion sampler has no use for."""
    given = [f for f in ("repetition_penalty",) if getattr(args, f) is not None]
    given += ["num_beams"] if args.num_beams != S.num_beams else []
    given += ["length_penalty"] if args.length_penalty != S.length_penalty else []
    given += ["stop"] if args.stop else []
    given += [f for f in ("logprobs", "perplexity") if getattr(args, f)]
    given += ["alternatives"] if args.alternatives != S.n_alternatives else []
    flags = ["--" + f.replace("_", "-") for f in given]
    if args.strategy in ("topk", "topp"):
        flags.append(f"--strategy {args.strategy}")
    if (args.greedy or args.strategy == "greedy") and args.temperature:
        flags.append("--temperature (--greedy means 0)")
    for flag, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
        if cfg.temperature == 0 and getattr(cfg, flag) != off:
            flags.append(f"--{flag.replace('_', '-')} (it applies only with --temperature above 0)")
    if cfg.temperature == 0 and args.gumbel_dtype is not None:
        flags.append("--gumbel-dtype (it applies only with --temperature above 0)")
    if args.gen_ppl_samples is not None and args.gen_ppl is None:
        flags.append("--gen-ppl-samples (it applies only with --gen-ppl)")
    return flags


def one_line(text: str) -> str:
    """A state of the text on a single line: line breaks shown as ↵."""
    return shorten(text, None, "↵")


# -- one loop for both samplers; what each shows is its own ----------------------------------------

def _generate(args: argparse.Namespace, lm, sampler, prompt: str, cfg, show: Callable,
              stopped: Callable | None = None):
    """Run ``sampler`` to the end, passing each event to ``show``; on Ctrl-C, ``stopped(partial)``
    tidies the screen and ``--json`` keeps what was produced so far. Returns the result."""
    run = sampler.start(lm, prompt, cfg)
    try:
        for ev in run:
            show(ev)
    except KeyboardInterrupt:
        run.close()
        partial = run.result
        if stopped is not None and partial is not None:
            stopped(partial)
        if args.json and partial is not None:
            atomic_write_json(args.json, sampler.to_json(lm, partial, stopped=True))
            print(f"wrote the {run.done} {sampler.done} so far to {args.json}", file=sys.stderr)
        raise
    return run.result


def _write_json(args: argparse.Namespace, lm, sampler, result, what: str = "", extra: dict | None = None) -> None:
    if args.json:
        atomic_write_json(args.json, {**sampler.to_json(lm, result), **(extra or {})})
        print(f"wrote {args.json}{what}", file=sys.stderr)


def run_diffusion(args: argparse.Namespace, lm, sampler, prompt: str) -> int:
    """``generate`` for a masked-diffusion model: every denoising state, on its own line with --stream."""
    from ..generation.diffusion import DenoiseStep, DiffusionStarted, render  # the engine: loaded only to run

    cfg = diffusion_config(args)
    ignored = diffusion_ignored_flags(args, cfg)
    if ignored:
        print(f"note: {lm.name} is a diffusion model; its sampler ignores {', '.join(ignored)}.", file=sys.stderr)
    started: list = []

    def show(ev) -> None:
        if isinstance(ev, DiffusionStarted):
            started.append(ev)
        elif isinstance(ev, DenoiseStep) and args.stream:
            P = len(started[0].prompt_ids)
            text = prompt + render(lm.tokenizer, ev.ids[P:], ev.masked[P:], MASK_GLYPH)
            sys.stdout.write(f"[{ev.step:>{len(str(ev.total_steps))}}/{ev.total_steps}] {one_line(text)}\n")
            sys.stdout.flush()

    result = _generate(args, lm, sampler, prompt, _seeded(cfg), show)
    print(result.text)
    s = result.settings
    print(f"[{len(result.completion_ids)} tokens in {result.steps} denoising steps, {result.seconds:.2f}s; "
          f"{s['strategy']} unmasking, temperature {s['temperature']:g}; seed {s['seed']}; model {result.model}]",
          file=sys.stderr)
    extra = score_samples(args, lm, prompt, cfg, result) if args.gen_ppl is not None else None
    _write_json(args, lm, sampler, result, f" (all {len(result.states)} states)", extra)
    return 0


def score_samples(args: argparse.Namespace, lm, prompt: str, cfg: DiffusionConfig, result) -> dict:
    """``--gen-ppl``: the generative perplexity of ``result`` and of ``--gen-ppl-samples`` - 1 more
    samples (the next seeds) under the autoregressive model ``args.gen_ppl``, on stderr; the
    returned keys join ``--json``."""
    from ..generation.evaluate import generative_perplexity, sample_diffusion
    from ..models.loading import load_model

    scorer = load_model(args.gen_ppl, device=str(lm.stack.device))
    n = args.gen_ppl_samples or 1
    more = list(sample_diffusion(lm, prompt, replace(cfg, seed=result.settings["seed"] + 1), n - 1)) if n > 1 else []
    completions = [result.completion] + [r.completion for r in more]
    gp = generative_perplexity(scorer, completions, prompt)
    print(f"[generative perplexity {gp.perplexity:.2f} under {gp.scorer}: mean NLL {gp.mean_nll:.4f} nats over "
          f"{gp.n_tokens} tokens of {gp.n_samples} sample{'s' if gp.n_samples != 1 else ''}]", file=sys.stderr)
    return {"generative_perplexity": gp.to_json(), "samples": completions}


def run_autoregressive(args: argparse.Namespace, lm, sampler, prompt: str, cfg: SamplingConfig) -> int:
    """``generate`` for an autoregressive model: greedy, sampling or beam search."""
    from ..generation.autoregressive import Started, TokenEvent  # the engine: loaded only to run

    diffusion_only = ["--" + f.replace("_", "-") for f in DIFFUSION_FLAGS if getattr(args, f) is not None]
    if diffusion_only:
        print(f"note: {', '.join(diffusion_only)} apply to diffusion models only; {lm.name} is autoregressive, "
              f"so they are ignored.", file=sys.stderr)
    ignored = ignored_flags(args, cfg)
    if ignored:
        mode = "--greedy" if cfg.greedy and cfg.num_beams == 1 else "beam search"
        print(f"note: {mode} ignores {', '.join(ignored)}.", file=sys.stderr)
    out = sys.stdout
    printer = StreamPrinter(out, max((len(s) for s in cfg.stop), default=1) - 1) if args.stream else None

    def show(ev) -> None:
        if printer is None:
            return
        if isinstance(ev, Started):  # the prompt is encoded and fits
            out.write(prompt)
            out.flush()
        elif isinstance(ev, TokenEvent):
            printer.update(ev.completion)

    def finish_line(partial) -> None:
        printer.finish(partial.completion)
        out.write("\n")

    sampling = not (cfg.greedy or cfg.num_beams > 1)
    result = _generate(args, lm, sampler, prompt, _seeded(cfg) if sampling else cfg, show,
                       finish_line if printer else None)
    if printer:
        finish_line(result)
    else:
        print(result.text)
    if args.logprobs:
        print()
        print(format_logprobs(result.tokens))
    if args.perplexity:
        ppl = result.prompt_perplexity
        print(f"prompt perplexity: {ppl:.4f}" if ppl is not None else
              "prompt perplexity: n/a (the prompt is a single token)")
    seed = f"; seed {result.settings.get('seed')}" if sampling else ""
    print(f"[{len(result.tokens)} tokens in {result.seconds:.2f}s, {result.tokens_per_s:.1f} tokens/s; "
          f"stopped by {result.stop_reason}{seed}; model {result.model}]", file=sys.stderr)
    _write_json(args, lm, sampler, result)
    return 0


def _seeded(cfg):
    """``cfg`` with a seed drawn now when it names none, so a run stopped early still reports it."""
    return cfg if cfg.seed is not None else replace(cfg, seed=draw_seed())


def run(args: argparse.Namespace) -> int:
    from ..generation.sampler import sampler_for  # the engine (torch) is imported here: --help stays fast

    # The sampling flags are checked before the model loads, but an error is held until the model
    # says which sampler runs: a diffusion model takes --temperature 0, and ignores the rest.
    try:
        cfg, bad_flags = sampling_config(args), None
    except LabError as e:
        cfg, bad_flags = None, e
    check_output(args.json, "--json")
    interventions = interventions_from_args(args)
    prompt = read_prompt(args.prompt)
    use_reference_weights(args)
    lm = load_from_args(args)
    sampler = sampler_for(lm)
    if interventions:
        from ..interventions.run import intervened_sampler
        sampler = intervened_sampler(sampler, lm, prompt, interventions, args.transcoders)
        print(f"interventions: {', '.join(interventions.specs())}", file=sys.stderr)
    if lm.untrained:
        print(f"note: {lm.name} has random weights, so its text is noise.", file=sys.stderr)
    if sampler.denoises:
        return run_diffusion(args, lm, sampler, prompt)
    if bad_flags is not None:
        raise bad_flags
    return run_autoregressive(args, lm, sampler, prompt, cfg)
