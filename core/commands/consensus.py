"""Replaces both consensus scripts (GPTConsensus.py for GPT-Neo / GPT-2 XL, GPT-2-Consensus.py).

One iteration = every block once, in order, then the final norm. Column 0 of every trace is
the embeddings (token + position), column 1 + i*L + l is after block l of iteration i (before
any final norm). Prompts come from --prompt (repeatable), --randomprompt / --random-prompt, or
stdin, one per line. Prompts of different lengths run as separate batches; nothing is truncated.

Files (written atomically, only when asked; every path is checked before the run starts, and a
--savefile PREFIX naming a folder, such as out/, writes out/consensus.npy and its companions):
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

Every run is also kept as a run folder, <runs root>/consensus/<--run-name, default the start time>/
(settings, status, the files above and what the Consensus page reopens a run from), written as it
goes, so a stopped or failed run keeps what it computed; the page lists it. --no-run-folder skips it.
--config RUN/config.json runs what a saved run describes again (the page's background runs use it).

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
import time

import numpy as np

from ..consensus.config import (ENGINES, GB, INTEGRATORS, LONG_RUN_S, MAX_DIM, MAX_MEMORY_BUDGET, MAX_TOKENS,
                                PACE_SAMPLE_S, ConsensusConfig, DecodeConfig, SimulationConfig, parse_iterations,
                                parse_qkv)
from ..consensus.files import output_paths, save_consensus, save_decode
from ..errors import LabError, shorten
from .cli import (add_model_args, bar_note, float_arg, int_arg, load_from_args, model_given, path_arg, progress,
                  read_stdin)
from ..interventions.flags import add_intervention_args, interventions_from_args

NAME = "consensus"
HELP = "Iterate a model's layer stack N times on prompts and record how the token vectors converge."
C, S = ConsensusConfig, SimulationConfig  # every flag's default is read from these, never restated


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
                   help=f"iterations N: each is every block once, then the final norm (default: {C.iterations}; "
                        f"with --simulate, integration steps, default {S.steps})")
    r.add_argument("--noff", action="store_true", help="skip the MLP (feed-forward) sublayers of every layer "
                                                         "(--ablate mlp:L skips one)")
    reinit = r.add_mutually_exclusive_group()
    reinit.add_argument("--randominit", "--random-init", dest="random_init", action="store_true",
                        help="re-initialise all weights once, with seed SEED, before the embeddings")
    reinit.add_argument("--fullrandom", action="store_true",
                        help="re-initialise with SEED before the embeddings and with SEED+i+1 after iteration i")
    reinit.add_argument("--const-reset", action="store_true",
                        help="re-initialise with SEED before the embeddings and with SEED+s after layer-step s "
                             "(s = 1 + i*L + l, after block l of iteration i)")
    r.add_argument("--seed", type=int, default=C.seed,
                   help="seed for random prompts, re-initialisation and sampling (default: %(default)s)")
    r.add_argument("--record-every", type=int_arg(1), default=C.record_every, metavar="K",
                   help="keep every K-th layer-step (and the first and last) when N*L is large (default: %(default)s)")
    r.add_argument("--engine", default=C.engine, choices=ENGINES,
                   help="block: one block at a time; iteration: a whole iteration at a time with batched metrics; "
                        "graph: iteration replayed as a CUDA graph; auto: graph on one GPU, else block "
                        "(same numbers; default: %(default)s)")
    r.add_argument("--memory-budget", type=float_arg(0, MAX_MEMORY_BUDGET / GB, low_open=True),
                   default=C.memory_budget / GB, metavar="GB",
                   help="refuse runs that would allocate more than this, all told: recorded arrays, prompts, batches "
                        "and device buffers; big prompt sets run in batches that fit (default: %(default)s)")
    d = parser.add_argument_group("decoding")
    d.add_argument("--use-model", type=int_arg(1), nargs="?", const=DecodeConfig.new_tokens, metavar="K",
                   help=f"generate K tokens (default {DecodeConfig.new_tokens}), each by N iterations over the whole "
                        "sequence and sampling from the final state")
    d.add_argument("--top-p", type=float_arg(0, 1, low_open=True, note="; 1 turns it off"), default=DecodeConfig.top_p,
                   help="nucleus sampling for --use-model (default: %(default)s)")
    d.add_argument("--decode", metavar="I,J,...",
                   help="print the logit-lens argmax decoding after these iterations (0-based), e.g. 0,4,9")
    o = parser.add_argument_group("files")
    o.add_argument("--savefile", metavar="PREFIX", type=path_arg, help="write PREFIX.npy and PREFIX_hidden.npy (or PREFIX_diag.npy)")
    o.add_argument("--eplot", metavar="FILE", type=path_arg, help="write the [B, N*L, 2] pairwise cosine / dot file")
    o.add_argument("--matrixerror", metavar="FILE", type=path_arg, help="write the [B, T, T, N*L] cosine matrices")
    o.add_argument("--run-name", metavar="NAME", type=path_arg,
                   help="keep the run in <runs root>/consensus/NAME/ (default: the start time, YYYYmmdd-HHMMSS); "
                        "a path with a slash names the folder itself")
    o.add_argument("--no-run-folder", action="store_true", help="keep no run folder (only the files asked for)")
    o.add_argument("--config", metavar="FILE", type=path_arg,
                   help="run what a run folder's config.json describes (prompts and settings; --model, --device, "
                        "--dtype, --run-name and the files flags still apply)")
    add_intervention_args(parser)
    add_simulation_arguments(parser)


def _read_stdin() -> list[str]:
    text = read_stdin("prompts, one per line,")
    return [line for line in (text or "").split("\n") if line.strip()]


def _budget(gb: float) -> int:
    """``--memory-budget`` in bytes (its range is checked while parsing)."""
    return int(gb * GB)


def _run_folder(args: argparse.Namespace):
    """``--run-name`` checked before any work (None with --no-run-folder)."""
    from ..consensus.runs import check_new_run

    if getattr(args, "no_run_folder", False):
        if getattr(args, "run_name", None) is not None:
            raise LabError("--run-name names the run folder that --no-run-folder turns off; drop one of them.")
        return None
    return check_new_run(getattr(args, "run_name", None))


def _writer(args: argparse.Namespace, config: dict):
    from ..consensus.runs import RunWriter

    return None if getattr(args, "no_run_folder", False) else RunWriter.create(config, getattr(args, "run_name", None))


def _kept(writer) -> None:
    if writer is not None:
        print(f"kept the run in {writer.folder}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "config", None):
        return run_config_command(args)
    if getattr(args, "simulate", False):
        return run_simulation_command(args)
    # the engine is imported here, not at the top: `--help` must not load torch
    from ..consensus.engine import consensus_decode_stream, consensus_stream, random_prompt_ids

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
    reinit = ("iteration" if args.fullrandom else "block" if args.const_reset
              else "once" if args.random_init else "none")
    decode_at = parse_iterations(args.decode, "--decode")
    size = args.size = C.iterations if args.size is None else args.size  # the default, resolved where it is seen
    late = [i for i in decode_at if not 0 <= i < size]
    if late:
        raise LabError(f"--decode {late[0]} is outside 0..{size - 1}: iterations count from 0 and --size is {size}.")
    cfg = ConsensusConfig(iterations=size, skip_mlp=args.noff, reinit=reinit, seed=args.seed,
                          record_every=args.record_every, matrix=args.matrixerror is not None,
                          decode_iterations=decode_at, memory_budget=_budget(args.memory_budget),
                          restore_weights=False, engine=args.engine,
                          interventions=tuple(interventions_from_args(args).specs()), transcoders=args.transcoders)
    cfg.check()  # before loading a model, so a typo costs nothing
    output_paths(args.savefile, args.eplot, args.matrixerror, decode=args.use_model is not None)
    _run_folder(args)
    decode = None
    if args.use_model is not None:
        decode = DecodeConfig(new_tokens=args.use_model, top_p=args.top_p, seed=args.seed)
        decode.check()

    lm = load_from_args(args)
    random = args.randomprompt or ([1, args.random_prompt] if args.random_prompt is not None else None)
    if random is not None:
        prompts = random_prompt_ids(lm, random[0], random[1], args.seed)
    else:
        prompts = args.prompt or _read_stdin()
        if not prompts:
            raise LabError("No prompts: pass --prompt TEXT, --randomprompt N L, or pipe prompts on stdin, "
                           "one per line.")

    events = consensus_decode_stream(lm, prompts, cfg, decode) if decode else consensus_stream(lm, prompts, cfg)
    return _consensus_to_end(args, lm, cfg, decode, events, _config(args, cfg, decode, random, prompts))


def _config(args, cfg: ConsensusConfig, decode, random, prompts) -> dict:
    """The run folder's config.json for a run given by flags."""
    from ..consensus.runs import run_config

    source = ({"source": "random", "n": int(random[0]), "length": int(random[1])} if random is not None
              else {"source": "typed", "texts": list(prompts)})
    label = f"{args.model} N={cfg.iterations}" + (" noff" if cfg.skip_mlp else "") + \
        ("" if cfg.reinit == "none" else f" reinit={cfg.reinit} seed={cfg.seed}") + \
        (f" decode K={decode.new_tokens}" if decode else "")
    return run_config("decode" if decode else "run", args.model, source, cfg, decode, label=label,
                      device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))


def run_config_command(args: argparse.Namespace) -> int:
    """``--config FILE``: the run a run folder's config.json describes (the model from the file
    unless --model is given)."""
    from pathlib import Path

    from ..consensus.runs import configs, read_config, stream

    path = Path(args.config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    config = read_config(path.parent) if path.name == "config.json" else None
    if config is None:
        raise LabError(f"--config takes a consensus run's config.json (got {shorten(str(args.config), 80)}).")
    if config["kind"] == "sim":
        return run_simulation_command(args, configs(config)[2] or SimulationConfig(), config)
    if not model_given(args) and config.get("model"):
        args.model = config["model"]
    config = {**config, "consensus": {**(config.get("consensus") or {}), "restore_weights": False}}  # the CLI owns its model
    cfg, decode, _ = configs(config)
    cfg.check()
    if decode is not None:
        decode.check()
    output_paths(args.savefile, args.eplot if decode is None else None, None, decode=decode is not None)
    _run_folder(args)
    lm = load_from_args(args)
    events = stream(config, lm)
    config = {**config, "model": args.model, "device": getattr(args, "device", None),
              "dtype": getattr(args, "dtype", None)}
    return _consensus_to_end(args, lm, cfg, decode, events, config)


def _consensus_to_end(args, lm, cfg: ConsensusConfig, decode, events, config: dict) -> int:
    """Run ``events`` to the end with a progress bar, keep the run folder and the files asked for,
    print the one-line summaries."""
    from ..consensus.engine import Finished, Progress, Started
    from ..consensus.estimate import estimate_run

    writer = _writer(args, config)
    if writer is not None:
        events = writer.watch(events)
    result = None

    def save():
        if decode:
            return save_decode(result, args.savefile)
        return save_consensus(result, args.savefile, args.eplot, args.matrixerror)

    try:
        started = next(events)
        assert isinstance(started, Started)
        result, n_layer = started.result, started.info["n_layer"]
        print(f"{lm.name}: {len(result.prompts)} prompt(s), N = {cfg.iterations} iterations x {n_layer} blocks = "
              f"{cfg.iterations * n_layer} layer-steps per prompt{' and new token' if decode else ''}"
              f"{'; interventions: ' + ', '.join(cfg.interventions) if cfg.interventions else ''}", file=sys.stderr)
        estimate = estimate_run(lm, result.token_ids, cfg, decode.new_tokens if decode else 0, result.prompts)
        print(f"  {estimate.caption()}", file=sys.stderr)
        paced = _say_long_runs(events, started.info["total"], Progress, "layer-steps")
        for ev in progress(paced, started.info["total"], "consensus",
                           position=lambda e: e.step if isinstance(e, Progress) else None):
            if isinstance(ev, Finished):
                result = ev.result
    except (KeyboardInterrupt, LabError) as e:
        events.close()
        if result is not None and any(f is not None for f in (args.savefile, args.eplot, args.matrixerror)):
            paths = save()
            print(f"stopped; kept what was computed in {', '.join(map(str, paths))}", file=sys.stderr)
        _kept(writer)
        raise e
    finally:
        events.close()  # the run folder says how the run ended

    if decode:
        for b, text in enumerate(result.texts):
            final = result.traces[b, :, -1]
            print(f"prompt {b + 1} ({len(result.token_ids[b])}+{len(result.new_ids[b])} tokens, final metric "
                  f"{np.nanmean(final):.4f} averaged over tokens): > {shorten(text, 200)}")
    else:
        for b, prompt in enumerate(result.prompts):
            m, er, cd = result.metric[b], result.effective_rank[b], result.centroid_distance[b]
            print(f"prompt {b + 1} ({len(result.token_ids[b])} tokens): metric {m[0]:.4f} -> {m[-1]:.4f}, "
                  f"effective rank {er[0]:.2f} -> {er[-1]:.2f}, centroid distance {cd[0]:.3g} -> {cd[-1]:.3g} "
                  f"after {result.total_steps} layer-steps  \"{shorten(prompt, 60)}\"")
        for it, texts in result.decodings.items():
            for b, text in enumerate(texts):
                print(f"prompt {b + 1}, iteration {it}: > {shorten(text or '', 200)}")
    for path in save():
        print(f"wrote {path}", file=sys.stderr)
    _kept(writer)
    return 0


def _say_long_runs(events, total: int, progress_type: type, unit: str):
    """Pass ``events`` through; once the run has gone :data:`PACE_SAMPLE_S` seconds, say how long
    the rest takes at that pace when the whole run takes over :data:`LONG_RUN_S` (once, above the bar).
    ``--size 1e9`` is a valid experiment, but its user should hear in seconds that it lasts days."""
    from ..consensus.estimate import long_run_notice

    start, said = time.monotonic(), False
    for ev in events:
        if not said and isinstance(ev, progress_type) and 0 < ev.step < total:
            elapsed = time.monotonic() - start
            if elapsed >= PACE_SAMPLE_S:
                said = True
                notice = long_run_notice(ev.step, total, elapsed, LONG_RUN_S, unit)
                if notice is not None:
                    bar_note(notice)
        yield ev


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
    g.add_argument("--tokens", type=int_arg(2, MAX_TOKENS), default=S.tokens, metavar="n",
                   help="tokens per cloud (default: %(default)s)")
    g.add_argument("--dim", type=int_arg(2, MAX_DIM), default=S.dim, metavar="d",
                   help="dimension of the space (default: %(default)s; layer Q/K/V use the model's width)")
    g.add_argument("--qkv", default=S.qkv, metavar="SOURCE",
                   help="identity, random (seeded), layer:K (block K of --model, head-averaged scores, V = W_O W_V) "
                        "or layer:K:H (head H of block K) (default: %(default)s)")
    g.add_argument("--dt", type=float_arg(0, low_open=True), default=S.dt,
                   help="integration step size (default: %(default)s)")
    g.add_argument("--beta", type=float_arg(), default=S.beta,
                   help="inverse temperature of the softmax (default: %(default)s)")
    g.add_argument("--integrator", choices=INTEGRATORS, default=S.integrator,
                   help="explicit Euler or classical RK4, each re-projected onto the sphere (default: %(default)s)")
    g.add_argument("--inits", type=int_arg(1), default=S.batch, metavar="B",
                   help="independent random initial conditions, integrated as one batch (default: %(default)s)")
    g.add_argument("--causal", action="store_true", help="masked attention: token i attends to tokens j <= i only")


def _simulation_config_from_args(args: argparse.Namespace) -> SimulationConfig:
    for dest, flag in _MODEL_RUN_FLAGS.items():
        value = getattr(args, dest, None)
        if value not in (None, False, [], ()):
            raise LabError(f"{flag} belongs to model runs and means nothing with --simulate; drop one of them.")
    budget_gb = getattr(args, "memory_budget", None)
    given = dict(steps=getattr(args, "size", None), seed=getattr(args, "seed", None),
                 record_every=getattr(args, "record_every", None),
                 memory_budget=None if budget_gb is None else _budget(budget_gb))
    cfg = SimulationConfig(tokens=args.tokens, dim=args.dim, qkv=args.qkv, dt=args.dt, beta=args.beta,
                           batch=args.inits, integrator=args.integrator, causal=bool(args.causal),
                           matrix=getattr(args, "matrixerror", None) is not None,
                           **{k: v for k, v in given.items() if v is not None})
    cfg.check()
    return cfg


def run_simulation_command(args: argparse.Namespace, cfg: SimulationConfig | None = None,
                           config: dict | None = None) -> int:
    """``python -m core consensus --simulate``: integrate, print one line per initial condition,
    and write the files asked for in the model runs' layouts (:mod:`core.consensus.files`; the
    initial conditions stand for prompts, the ``n`` points for tokens, ``d`` for the width):
    ``--savefile PREFIX``: ``PREFIX.npy`` float32 [B, P] metric and ``PREFIX_hidden.npy``
    [B, n, d]; ``--eplot FILE`` [B, P-1, 2]; ``--matrixerror FILE`` [B, n, n, P-1]. A stopped
    or failed simulation writes what it computed. ``cfg`` and ``config`` come from --config."""
    from ..consensus.results import Finished, Progress
    from ..consensus.runs import run_config
    from ..consensus.simulation import simulation_stream  # the engine (torch), loaded only to run (see run)

    if cfg is None:
        cfg = _simulation_config_from_args(args)
    elif getattr(args, "matrixerror", None) is not None and not cfg.matrix:
        raise LabError("--matrixerror needs the token matrices, which this saved simulation did not record; drop it.")
    output_paths(getattr(args, "savefile", None), getattr(args, "eplot", None), getattr(args, "matrixerror", None))
    _run_folder(args)
    layer = parse_qkv(cfg.qkv)[0] == "layer"
    if layer and config is not None and not model_given(args) and config.get("model"):
        args.model = config["model"]
    lm = load_from_args(args) if layer else None
    events = simulation_stream(cfg, lm, getattr(args, "device", None))
    label = (config or {}).get("label") or cfg.label() + f" seed={cfg.seed}"
    config = run_config("sim", args.model if layer else None, None, simulation=cfg, label=label,
                        device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
    writer = _writer(args, config)
    if writer is not None:
        events = writer.watch(events)
    started = next(events)
    result = started.result
    print(f"simulating {cfg.batch} x {cfg.tokens} tokens on the sphere in R^{result.hidden.shape[-1]}: "
          f"{started.info['qkv']}; {cfg.integrator}, dt = {cfg.dt:g}, beta = {cfg.beta:g}, {cfg.steps} steps on "
          f"{started.info['device']}", file=sys.stderr)

    def save():
        return save_consensus(result, getattr(args, "savefile", None), getattr(args, "eplot", None),
                              getattr(args, "matrixerror", None))

    try:
        for ev in progress(_say_long_runs(events, cfg.steps, Progress, "steps"), cfg.steps, "simulate",
                           position=lambda e: e.step if isinstance(e, Progress) else None):
            if isinstance(ev, Finished):
                result = ev.result
    except (KeyboardInterrupt, LabError) as e:
        events.close()
        paths = save()
        if paths:
            print(f"stopped; kept what was computed in {', '.join(map(str, paths))}", file=sys.stderr)
        _kept(writer)
        raise e
    finally:
        events.close()
    for b, name in enumerate(result.prompts):
        m, c = result.metric[b], result.mean_cosine[b]
        print(f"{name}: metric {m[0]:.4f} -> {m[-1]:.4g}, mean cosine {c[0]:.4f} -> {c[-1]:.6f} "
              f"after {cfg.steps} steps (t = {cfg.steps * cfg.dt:g})")
    for path in save():
        print(f"wrote {path}", file=sys.stderr)
    _kept(writer)
    return 0
