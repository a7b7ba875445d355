"""The intervention flags ``generate`` and ``consensus`` share, declared once (torch-free)."""
from __future__ import annotations

import argparse

from .spec import ABLATE_HELP, STEER_HELP, STEER_VECTOR_HELP, Interventions, from_flags


def add_intervention_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("interventions (TransformerLens hook names; see README, Interventions)")
    g.add_argument("--ablate", action="append", default=[], metavar="SPEC", help=ABLATE_HELP)
    g.add_argument("--steer", action="append", default=[], metavar="L.F=SCALE", help=STEER_HELP)
    g.add_argument("--steer-vector", dest="steer_vector", action="append", default=[], metavar="FILE.npy@HOOK",
                   help=STEER_VECTOR_HELP)
    g.add_argument("--transcoders", metavar="DIR",
                   help="the transcoder set feature:L.F and --steer use (default: the model's own)")


def interventions_from_args(args: argparse.Namespace) -> Interventions:
    """The :class:`Interventions` the flags name (parsed before any model loads, so a typo fails fast)."""
    return from_flags(getattr(args, "ablate", ()), getattr(args, "steer", ()), getattr(args, "steer_vector", ()))
