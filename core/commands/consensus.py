"""Replaces both consensus scripts (GPTConsensus.py for GPT-Neo / GPT-2 XL, GPT-2-Consensus.py).

One iteration = every block once, in order, then the final norm. Column 0 of every trace is
the embeddings (token + position), column 1 + i*L + l is after block l of iteration i (before
any final norm). Prompts come from --prompt (repeatable), --randomprompt / --random-prompt, or
stdin, one per line. Prompts of different lengths run as separate batches; nothing is truncated.

Files (written atomically, only when asked):
  --savefile PREFIX          PREFIX.npy float32 [B, N*L+1] metric 1 - mean_j |cos(h_0, h_j)| over all
                             tokens j (j = 0 included); PREFIX_hidden.npy float32 [B, T, D] final state
  --savefile PREFIX with --use-model K
                             PREFIX.npy unicode [B] prompt + generated text; PREFIX_diag.npy float32
                             [K*B, N*L+1], row k*B + b = prompt b's trace while generating token k
  --eplot FILE               float32 [B, N*L, 2] mean pairwise cosine, mean pairwise raw dot product
                             (off-diagonal pairs i != j) after each block
  --matrixerror FILE         float32 [B, T, T, N*L] token-by-token cosine matrices after each block
With prompts of unequal length, T is the longest prompt and shorter prompts are NaN-padded at
the end of their token axes. With --record-every K the column axes keep layer-steps 0, K, 2K, ...
and always the last one instead of all N*L+1 (N*L for --eplot / --matrixerror, which start at K).

With --simulate, the paper's continuous-time attention dynamics run instead of a model (see the
simulation flags below); the same files and layouts are written.

Examples (the scripts' commands, one for one):
  python -m core consensus --model EleutherAI/gpt-neo-2.7B --size 500 --prompt "..."
  python -m core consensus --nneo --noff
  python -m core consensus --randomprompt 5 50 --size 300
  python -m core consensus --use-model 100 --size 20
  python -m core consensus --randomprompt 1 100 --savefile output_metrics
  python -m core consensus --nneo --decode 0,4,9 --matrixerror matrix_output --eplot error_output
"""
from __future__ import annotations

import argparse
import sys

from ..consensus.config import (DEFAULT_ITERATIONS, ENGINES, INTEGRATORS, ConsensusConfig, DecodeConfig,
                                SimulationConfig, parse_qkv)
from ..errors import LabError
from .cli import add_model_args, float_arg, int_arg, load_from_args, progress

NAME = "consensus"
GB = 1024 ** 3
HELP = "Iterate a model's layer stack N times on prompts and record how the token vectors converge."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--nneo", action="store_true", help="use gpt2-xl (same as --model gpt2-xl)")
    g = parser.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeat for several); without --prompt or a random prompt, prompts are "
                        "read from stdin, one per line")
    g.add_argument("--randomprompt", type=int_arg(1), nargs=2, metavar=("N", "L"),
                   help="N prompts of L uniformly random token ids (seeded by --seed)")
    g.add_argument("--random-prompt", type=int_arg(1), metavar="L", help="one prompt of L random token ids")
    r = parser.add_argument_group("run")
    r.add_argument("--size", type=int_arg(1), metavar="N",
                   help=f"iterations N: each is every block once, then the final norm (default: {DEFAULT_ITERATIONS}; "
                        f"with --simulate, integration steps, default {SimulationConfig.steps})")
    r.add_argument("--noff", action="store_true", help="skip the MLP (feed-forward) sublayers")
    reinit = r.add_mutually_exclusive_group()
    reinit.add_argument("--randominit", "--random-init", dest="random_init", action="store_true",
                        help="re-initialise all weights once, with seed SEED, before the embeddings")
    reinit.add_argument("--fullrandom", action="store_true",
                        help="re-initialise with SEED before the embeddings and with SEED+i+1 after iteration i")
    reinit.add_argument("--const-reset", action="store_true",
                        help="re-initialise with SEED before the embeddings and with SEED+s after layer-step s "
                             "(s = 1 + i*L + l, after block l of iteration i)")
    r.add_argument("--seed", type=int, default=ConsensusConfig.seed, help="seed for random prompts, re-initialisation and "
                                                        "sampling (default: %(default)s)")
    r.add_argument("--record-every", type=int_arg(1), default=ConsensusConfig.record_every, metavar="K",
                   help="keep every K-th layer-step (and the first and last) when N*L is large (default: 1)")
    r.add_argument("--engine", default=ConsensusConfig.engine, choices=ENGINES,
                   help="block: one block at a time; iteration: a whole iteration at a time with batched metrics; "
                        "graph: iteration replayed as a CUDA graph; auto: graph on one GPU, else block "
                        "(same numbers; default: %(default)s)")
    r.add_argument("--memory-budget", type=float_arg(0, low_open=True), default=ConsensusConfig.memory_budget / GB,
                   metavar="GB",
                   help="refuse runs whose recorded arrays need more host memory than this (default: %(default)s)")
    d = parser.add_argument_group("decoding")
    d.add_argument("--use-model", type=int_arg(1), nargs="?", const=DecodeConfig.new_tokens, metavar="K",
                   help=f"generate K tokens (default {DecodeConfig.new_tokens}), each by N iterations over the whole sequence and "
                        "sampling from the final state")
    d.add_argument("--top-p", type=float_arg(0, 1, low_open=True, note="; 1 turns it off"), default=DecodeConfig.top_p,
                   help="nucleus sampling for --use-model (default: %(default)s)")
    d.add_argument("--decode", metavar="I,J,...",
                   help="print the logit-lens argmax decoding after these iterations (0-based), e.g. 0,4,9")
    o = parser.add_argument_group("files")
    o.add_argument("--savefile", metavar="PREFIX", help="write PREFIX.npy and PREFIX_hidden.npy (or PREFIX_diag.npy)")
    o.add_argument("--eplot", metavar="FILE", help="write the [B, N*L, 2] pairwise cosine / dot file")
    o.add_argument("--matrixerror", metavar="FILE", help="write the [B, T, T, N*L] cosine matrices")
    add_simulation_arguments(parser)


def _decode_iterations(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(sorted({int(x) for x in text.replace(" ", "").split(",") if x}))
    except ValueError:
        raise LabError(f"--decode takes iterations as comma-separated numbers like 0,4,9 (got '{text}').") from None


def _read_stdin() -> list[str]:
    if sys.stdin is None:
        return []
    if sys.stdin.isatty():
        print("Reading prompts from stdin, one per line; finish with Ctrl-D.", file=sys.stderr)
    return [line.rstrip("\r\n") for line in sys.stdin.read().splitlines() if line.strip()]


def _one_line(text: str, limit: int = 80) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run(args: argparse.Namespace) -> int:
    if getattr(args, "simulate", False):
        return run_simulation_command(args)
    # the engine is imported here, not at the top: `--help` must not load torch
    import numpy as np

    from ..consensus.engine import Finished, Progress, Started, consensus_decode_stream, consensus_stream, random_prompt_ids
    from ..consensus.files import save_consensus, save_decode

    if args.size is None:
        args.size = DEFAULT_ITERATIONS
    if args.nneo:
        if args.model not in ("default", "gpt2-xl"):
            raise LabError(f"--nneo means --model gpt2-xl, but --model {args.model} was given too; pass one of them.")
        args.model = "gpt2-xl"
    randoms = [a for a in ("randomprompt", "random_prompt") if getattr(args, a) is not None]
    if args.prompt and randoms:
        raise LabError("Pass either --prompt or a random prompt (--randomprompt / --random-prompt), not both.")
    if len(randoms) > 1:
        raise LabError("Pass only one of --randomprompt N L and --random-prompt L.")
    if args.use_model is not None and (args.eplot or args.matrixerror or args.decode):
        raise LabError("--eplot, --matrixerror and --decode record consensus runs; drop them with --use-model, "
                       "whose --savefile writes the texts and per-token traces.")
    if not args.memory_budget > 0:
        raise LabError(f"--memory-budget must be above 0 GB (got {args.memory_budget}).")
    reinit = ("iteration" if args.fullrandom else "block" if args.const_reset
              else "once" if args.random_init else "none")
    decode_at = _decode_iterations(args.decode)
    late = [i for i in decode_at if not 0 <= i < args.size]
    if late:
        raise LabError(f"--decode {late[0]} is outside 0..{args.size - 1}: iterations count from 0 and --size is "
                       f"{args.size}.")
    cfg = ConsensusConfig(iterations=args.size, skip_mlp=args.noff, reinit=reinit, seed=args.seed,
                          record_every=args.record_every, matrix=bool(args.matrixerror),
                          decode_iterations=decode_at,
                          memory_budget=int(args.memory_budget * GB), restore_weights=False,
                          engine=args.engine)
    cfg.check()  # before loading a model, so a typo costs nothing
    decode = None
    if args.use_model is not None:
        decode = DecodeConfig(new_tokens=args.use_model, top_p=args.top_p, seed=args.seed)
        decode.check()

    lm = load_from_args(args)
    if args.randomprompt is not None:
        prompts = random_prompt_ids(lm, args.randomprompt[0], args.randomprompt[1], args.seed)
    elif args.random_prompt is not None:
        prompts = random_prompt_ids(lm, 1, args.random_prompt, args.seed)
    else:
        prompts = args.prompt or _read_stdin()
        if not prompts:
            raise LabError("No prompts: pass --prompt TEXT, --randomprompt N L, or pipe prompts on stdin, "
                           "one per line.")

    events = consensus_decode_stream(lm, prompts, cfg, decode) if decode else consensus_stream(lm, prompts, cfg)
    result = None

    def save():
        if decode:
            return save_decode(result, args.savefile)
        return save_consensus(result, args.savefile, args.eplot, args.matrixerror)

    started = next(events)
    assert isinstance(started, Started)
    result, n_layer = started.result, started.info["n_layer"]
    print(f"{lm.name}: {len(result.prompts)} prompt(s), N = {cfg.iterations} iterations x {n_layer} blocks = "
          f"{cfg.iterations * n_layer} layer-steps per prompt{' and new token' if decode else ''}", file=sys.stderr)
    try:
        for ev in progress(events, started.info["total"], "consensus",
                           position=lambda e: e.step if isinstance(e, Progress) else None):
            if isinstance(ev, Finished):
                result = ev.result
    except (KeyboardInterrupt, LabError) as e:
        if result is not None and (args.savefile or args.eplot or args.matrixerror):
            paths = save()
            print(f"stopped; kept what was computed in {', '.join(map(str, paths))}", file=sys.stderr)
        raise e

    if decode:
        for b, text in enumerate(result.texts):
            final = result.traces[b, :, -1]
            print(f"prompt {b + 1} ({len(result.token_ids[b])}+{len(result.new_ids[b])} tokens, final metric "
                  f"{np.nanmean(final):.4f} averaged over tokens): > {_one_line(text, 200)}")
    else:
        for b, prompt in enumerate(result.prompts):
            m, er = result.metric[b], result.effective_rank[b]
            print(f"prompt {b + 1} ({len(result.token_ids[b])} tokens): metric {m[0]:.4f} -> {m[-1]:.4f}, "
                  f"effective rank {er[0]:.2f} -> {er[-1]:.2f} after {result.total_steps} layer-steps  "
                  f"\"{_one_line(prompt, 60)}\"")
        for it, texts in result.decodings.items():
            for b, text in enumerate(texts):
                print(f"prompt {b + 1}, iteration {it}: > {_one_line(text or '', 200)}")
    for path in save():
        print(f"wrote {path}", file=sys.stderr)
    return 0


# -- command line: `python -m core consensus --simulate` ------------------------------------------

_MODEL_RUN_FLAGS = {  # dest -> flag: consensus flags that mean nothing for a simulation
    "prompt": "--prompt", "use_model": "--use-model", "noff": "--noff", "random_init": "--randominit",
    "fullrandom": "--fullrandom", "const_reset": "--const-reset", "randomprompt": "--randomprompt",
    "random_prompt": "--random-prompt", "decode": "--decode", "nneo": "--nneo",
}


def add_simulation_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--simulate`` flags. The consensus command already declares ``--size`` (steps),
    ``--seed``, ``--savefile``, ``--eplot``, ``--matrixerror`` and the model flags; these are the rest."""
    g = parser.add_argument_group("simulation (--simulate: the paper's continuous-time model instead of a model run)")
    g.add_argument("--simulate", action="store_true",
                   help="integrate n tokens on the unit sphere in R^d under attention dynamics; --size is the "
                        "number of integration steps")
    g.add_argument("--tokens", type=int, default=SimulationConfig.tokens, metavar="n",
                   help="tokens per cloud (default: %(default)s)")
    g.add_argument("--dim", type=int, default=SimulationConfig.dim, metavar="d",
                   help="dimension of the space (default: %(default)s; layer Q/K/V use the model's width)")
    g.add_argument("--qkv", default=SimulationConfig.qkv, metavar="SOURCE",
                   help="identity, random (seeded), layer:K (block K of --model, head-averaged scores, V = W_O W_V) "
                        "or layer:K:H (head H of block K) (default: %(default)s)")
    g.add_argument("--dt", type=float, default=SimulationConfig.dt, help="integration step size (default: %(default)s)")
    g.add_argument("--beta", type=float, default=SimulationConfig.beta, help="inverse temperature of the softmax (default: %(default)s)")
    g.add_argument("--integrator", choices=INTEGRATORS, default=SimulationConfig.integrator,
                   help="explicit Euler or classical RK4, each re-projected onto the sphere (default: %(default)s)")
    g.add_argument("--inits", type=int, default=SimulationConfig.batch, metavar="B",
                   help="independent random initial conditions, integrated as one batch (default: %(default)s)")
    g.add_argument("--causal", action="store_true", help="masked attention: token i attends to tokens j <= i only")


def _simulation_config_from_args(args: argparse.Namespace) -> SimulationConfig:
    for dest, flag in _MODEL_RUN_FLAGS.items():
        value = getattr(args, dest, None)
        if value not in (None, False, [], ()):
            raise LabError(f"{flag} belongs to model runs and means nothing with --simulate; drop one of them.")
    steps = getattr(args, "size", None)
    budget_gb = getattr(args, "memory_budget", None)
    if budget_gb is not None and not budget_gb > 0:
        raise LabError(f"--memory-budget must be above 0 GB (got {budget_gb}).")
    seed = getattr(args, "seed", None)
    given = dict(steps=steps, seed=seed, record_every=getattr(args, "record_every", None),
                 memory_budget=None if budget_gb is None else int(budget_gb * GB))
    return SimulationConfig(tokens=args.tokens, dim=args.dim, qkv=args.qkv, dt=args.dt, beta=args.beta,
                            batch=args.inits, integrator=args.integrator, causal=bool(args.causal),
                            matrix=bool(getattr(args, "matrixerror", None)),
                            **{k: v for k, v in given.items() if v is not None})


def run_simulation_command(args: argparse.Namespace) -> int:
    """``python -m core consensus --simulate``: integrate, print one line per initial condition,
    and write the files asked for in the model runs' layouts (:mod:`core.consensus.files`; the
    initial conditions stand for prompts, the ``n`` points for tokens, ``d`` for the width):
    ``--savefile PREFIX``: ``PREFIX.npy`` float32 [B, P] metric and ``PREFIX_hidden.npy``
    [B, n, d]; ``--eplot FILE`` [B, P-1, 2]; ``--matrixerror FILE`` [B, n, n, P-1]. A stopped
    or failed simulation writes what it computed."""
    from ..consensus.files import save_consensus  # the engine, loaded only to run (see run)
    from ..consensus.results import Finished, Progress
    from ..consensus.simulation import simulation_stream

    cfg = _simulation_config_from_args(args)
    lm = load_from_args(args) if parse_qkv(cfg.qkv)[0] == "layer" else None
    events = simulation_stream(cfg, lm, getattr(args, "device", None))
    started = next(events)
    result = started.result
    print(f"simulating {cfg.batch} x {cfg.tokens} tokens on the sphere in R^{result.hidden.shape[-1]}: "
          f"{started.info['qkv']}; {cfg.integrator}, dt = {cfg.dt:g}, beta = {cfg.beta:g}, {cfg.steps} steps on "
          f"{started.info['device']}", file=sys.stderr)

    def save():
        return save_consensus(result, getattr(args, "savefile", None), getattr(args, "eplot", None),
                              getattr(args, "matrixerror", None))

    try:
        for ev in progress(events, cfg.steps, "simulate",
                           position=lambda e: e.step if isinstance(e, Progress) else None):
            if isinstance(ev, Finished):
                result = ev.result
    except (KeyboardInterrupt, LabError) as e:
        paths = save()
        if paths:
            print(f"stopped; kept what was computed in {', '.join(map(str, paths))}", file=sys.stderr)
        raise e
    for b, name in enumerate(result.prompts):
        m, c = result.metric[b], result.mean_cosine[b]
        print(f"{name}: metric {m[0]:.4f} -> {m[-1]:.4g}, mean cosine {c[0]:.4f} -> {c[-1]:.6f} "
              f"after {cfg.steps} steps (t = {cfg.steps * cfg.dt:g})")
    for path in save():
        print(f"wrote {path}", file=sys.stderr)
    return 0
