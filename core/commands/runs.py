"""Runs live under runs/ (or $GPTLAB_RUNS, or --root); a RUN is a run name there or a run folder path.

A run is a folder GPT Lab's training made (it carries a .gptlab-job marker; older runs directly in
the runs folder are recognised by their files); anything else, a model folder say, is refused, and
delete removes only runs inside the runs folder. A run whose files are broken lists as unreadable.

Examples:
  python -m core runs list
  python -m core runs status 20250101-120000-ar-tiny --log 30
  python -m core runs stop 20250101-120000-ar-tiny --wait 60
  python -m core runs resume 20250101-120000-ar-tiny --max-steps 4000
  python -m core runs delete 20250101-120000-ar-tiny
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LabError
from ..training import runs  # torch-free: run folders, not the trainer
from ..training.config import LIMITS
from .cli import float_arg, int_arg, path_arg

NAME = "runs"
HELP = "List training runs; show status, stop (with a checkpoint), resume or delete one."
ACTIONS = ("list", "status", "stop", "resume", "delete")
MAX_STEPS = LIMITS["max_steps"]  # what `train --max-steps` takes: a resumed run is refused here, not in its process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # optional here so that a missing action gets run()'s sentence instead of argparse's "required: action"
    parser.add_argument("action", nargs="?", choices=ACTIONS, metavar="<action>",
                        help="list, status, stop, resume or delete")
    parser.add_argument("target", nargs="?", metavar="RUN", type=path_arg, help="run name (under --root) or run folder")
    parser.add_argument("--root", metavar="DIR", type=path_arg, help="folder holding the runs (default runs/ or $GPTLAB_RUNS)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--log", type=int_arg(0), default=10, metavar="N",
                        help="status: log lines to show (default 10)")
    parser.add_argument("--wait", type=float_arg(0), default=0.0, metavar="S",
                        help="stop: wait up to S seconds for the checkpoint and the stop")
    parser.add_argument("--max-steps", dest="max_steps", type=int_arg(MAX_STEPS.low, MAX_STEPS.high), metavar="N",
                        help="resume: train up to N steps (needed to extend a finished run)")


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:

    if args.action is None:
        raise LabError(f"Say what to do: python -m core runs {{{','.join(ACTIONS)}}} [RUN], e.g. "
                       f"`python -m core runs list`.")
    root = Path(args.root).expanduser() if args.root else None
    if root is not None and not root.is_dir():
        raise LabError(f"--root {args.root} is not a folder; pass the folder holding the runs (default runs/ or $GPTLAB_RUNS).")
    if args.action == "list":
        items = runs.list_runs(root)
        if args.json:
            print(json.dumps([r.to_json() for r in items], indent=2))
            return 0
        if not items:
            print(f"no runs under {root or runs.runs_root()}")
            return 0
        print(f"{'run':<40} {'state':<9} {'step':>11} {'train':>7} {'val':>7}  model / objective / dataset")
        for r in items:
            steps = f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step)
            about = r.reason if r.state == "unreadable" else f"{r.model} / {r.objective} / {r.dataset}"
            print(f"{r.id:<40} {r.state:<9} {steps:>11} {_fmt(r.train_loss, '.4f'):>7} {_fmt(r.val_loss, '.4f'):>7}  "
                  f"{about}")
        return 0
    if not args.target:
        raise LabError(f"`runs {args.action}` needs a RUN (a name from `python -m core runs list`, or a run folder).")
    if args.action == "status":
        info = runs.run_info(args.target, root)
        info.last_log = runs.log_tail(info.path, args.log)
        if args.json:
            print(json.dumps(info.to_json(), indent=2))
            return 0
        print(f"run:         {info.path}\nstate:       {info.state}\nstep:        {info.step}"
              + (f" / {info.max_steps}" if info.max_steps else "")
              + f"\ntrain loss:  {_fmt(info.train_loss, '.4f')}\nval loss:    {_fmt(info.val_loss, '.4f')}"
              + f"\ncheckpoints: {', '.join(map(str, info.checkpoints)) or '-'}\nupdated:     {info.updated}")
        if info.reason:
            print(f"reason:      {info.reason}")
        if info.last_log:
            print("log:\n  " + "\n  ".join(info.last_log))
        return 0
    if args.action == "stop":
        info = runs.stop(args.target, root, wait=args.wait)
        print(f"{info.id}: {'stop requested' if info.state == 'running' else info.state} at step {info.step}")
        return 0
    if args.action == "resume":
        info = runs.resume(args.target, root, max_steps=args.max_steps)
        print(f"{info.id}: resumed (pid {info.pid}); follow with `python -m core runs status {info.id}`")
        return 0
    runs.delete(args.target, root)
    print(f"deleted {args.target}")
    return 0
