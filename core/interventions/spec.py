"""Interventions as words: the ``--ablate`` / ``--steer`` / ``--steer-vector`` specs, parsed once.

The CLI's flags, the pages' panels, run records and JSON outputs all read and write these specs,
so one spelling means one intervention everywhere:

- ``head:L.H``     zero head ``H`` of block ``L`` (its slice of ``blocks.L.attn.hook_z``)
- ``attn:L``       zero block ``L``'s attention output (``blocks.L.hook_attn_out``)
- ``mlp:L``        zero block ``L``'s MLP output (``blocks.L.hook_mlp_out``)
- ``layer:L``      both: block ``L`` then passes its input through unchanged
- ``feature:L.F``  splice the transcoder of layer ``L`` in for the MLP, with feature ``F`` zeroed
- any of them ``...:mean``: replace with the mean over the prompt's positions instead of zero
- ``L.F=SCALE``    (``--steer``) add ``SCALE`` times feature ``F``'s decoder row to ``blocks.L.hook_mlp_out``
- ``FILE.npy@HOOK`` (``--steer-vector``) add the vector in FILE at point HOOK, at every position

Torch-free: ``python -m core generate --help`` names these without loading torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import ABLATION_KINDS, ABLATION_MODES  # noqa: F401 (the spellings below)
from ..errors import LabError

ABLATE_HELP = ("ablate a component (repeatable): head:L.H, attn:L, mlp:L, layer:L, feature:L.F "
               "(needs a transcoder set); add :mean to replace with its mean over the prompt instead of zero")
STEER_HELP = "add SCALE times transcoder feature F's decoder direction to layer L's MLP output (repeatable)"
STEER_VECTOR_HELP = "add the vector saved in FILE.npy (float, shape (d_model,)) at activation point HOOK (repeatable)"

_ABLATE = re.compile(rf"^({'|'.join(ABLATION_KINDS)}):(\d+)(?:\.(\d+))?(?::({'|'.join(ABLATION_MODES)}))?$")
_STEER = re.compile(r"^(\d+)\.(\d+)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class Ablation:
    kind: str                 # one of ABLATION_KINDS
    layer: int
    index: int | None = None  # the head (head:) or the feature (feature:)
    mode: str = "zero"        # one of ABLATION_MODES

    @property
    def spec(self) -> str:
        where = f"{self.layer}.{self.index}" if self.index is not None else f"{self.layer}"
        return f"{self.kind}:{where}" + (":mean" if self.mode == "mean" else "")

    def record(self) -> dict:
        return {"type": "ablate", "spec": self.spec, "kind": self.kind, "layer": self.layer,
                "index": self.index, "mode": self.mode}


@dataclass(frozen=True)
class Steer:
    layer: int
    feature: int
    scale: float

    @property
    def spec(self) -> str:
        return f"{self.layer}.{self.feature}={self.scale:g}"

    def record(self) -> dict:
        return {"type": "steer", "spec": self.spec, "layer": self.layer, "feature": self.feature, "scale": self.scale}


@dataclass(frozen=True)
class SteerVector:
    path: str
    hook: str

    @property
    def spec(self) -> str:
        return f"{self.path}@{self.hook}"

    def record(self) -> dict:
        return {"type": "steer_vector", "spec": self.spec, "path": self.path, "hook": self.hook}


@dataclass(frozen=True)
class Interventions:
    """Everything one run changes in the model's walk, in the order it was given."""

    ablations: tuple[Ablation, ...] = ()
    steers: tuple[Steer, ...] = ()
    vectors: tuple[SteerVector, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.ablations or self.steers or self.vectors)

    @property
    def needs_transcoders(self) -> bool:
        return bool(self.steers) or any(a.kind == "feature" for a in self.ablations)

    @property
    def needs_prompt_means(self) -> bool:
        return any(a.mode == "mean" for a in self.ablations)

    def specs(self) -> list[str]:
        """Spec strings that :func:`parse_specs` turns back into these interventions."""
        return ([a.spec for a in self.ablations] + [f"steer:{s.spec}" for s in self.steers]
                + [f"steer-vector:{v.spec}" for v in self.vectors])

    def records(self) -> list[dict]:
        """What JSON outputs and run records keep: one object per intervention."""
        return [x.record() for x in (*self.ablations, *self.steers, *self.vectors)]

    def check(self, n_layer: int, n_head: int) -> None:
        """Raise :class:`LabError` for a layer or head the model does not have."""
        for x in (*self.ablations, *self.steers):
            if not 0 <= x.layer < n_layer:
                raise LabError(f"Intervention '{x.spec}' names layer {x.layer}, but the model has layers "
                               f"0..{n_layer - 1}; pick one of those.")
        for a in self.ablations:
            if a.kind == "head" and not 0 <= a.index < n_head:
                raise LabError(f"Intervention '{a.spec}' names head {a.index}, but the model's layers have heads "
                               f"0..{n_head - 1}; pick one of those.")


def parse_ablation(text: str) -> Ablation:
    """``head:3.5``, ``mlp:2:mean``, ... (module docstring) -> :class:`Ablation`."""
    m = _ABLATE.match(str(text).strip().lower())
    if m is None:
        raise LabError(f"Cannot read the ablation '{text}'; write head:L.H, attn:L, mlp:L, layer:L or "
                       f"feature:L.F (L a layer, H a head, F a feature, counted from 0), optionally followed by "
                       f":mean, e.g. head:0.3 or mlp:2:mean.", fix={"ablate": "head:0.0"})
    kind, layer, index, mode = m.group(1), int(m.group(2)), m.group(3), m.group(4) or "zero"
    if (kind in ("head", "feature")) != (index is not None):
        shape = f"{kind}:L.{'H' if kind == 'head' else 'F'}" if kind in ("head", "feature") else f"{kind}:L"
        raise LabError(f"The ablation '{text}' is written {shape}; e.g. "
                       f"{shape.replace('L', '0').replace('.H', '.1').replace('.F', '.7')}.")
    return Ablation(kind, layer, int(index) if index is not None else None, mode)


def parse_steer(text: str) -> Steer:
    """``L.F=SCALE`` -> :class:`Steer`."""
    m = _STEER.match(str(text).strip())
    if m is None:
        raise LabError(f"Cannot read the steering '{text}'; write L.F=SCALE (layer L, transcoder feature F, a "
                       f"number SCALE), e.g. 1.42=8 or 0.3=-4.")
    return Steer(int(m.group(1)), int(m.group(2)), float(m.group(3)))


def parse_steer_vector(text: str) -> SteerVector:
    """``FILE.npy@HOOK`` -> :class:`SteerVector` (the hook's name is checked against the model later)."""
    path, sep, hook = str(text).rpartition("@")
    if not sep or not path or not hook.strip():
        raise LabError(f"Cannot read the steering vector '{text}'; write FILE.npy@HOOK, e.g. "
                       f"direction.npy@blocks.1.hook_resid_post.")
    if not path.endswith(".npy"):
        raise LabError(f"The steering vector file '{path}' must be a .npy file (numpy.save of a float vector "
                       f"of the model's width).")
    return SteerVector(path, hook.strip())


def parse_specs(specs) -> Interventions:
    """Spec strings as :meth:`Interventions.specs` writes them (``steer:`` and ``steer-vector:``
    prefixes mark the two steering kinds) -> :class:`Interventions`."""
    ablate, steer, vectors = [], [], []
    for s in specs or ():
        s = str(s)
        if s.startswith("steer:"):
            steer.append(s[len("steer:"):])
        elif s.startswith("steer-vector:"):
            vectors.append(s[len("steer-vector:"):])
        else:
            ablate.append(s)
    return from_flags(ablate, steer, vectors)


def from_flags(ablate=(), steer=(), steer_vector=()) -> Interventions:
    """The interventions ``--ablate``, ``--steer`` and ``--steer-vector`` name (each repeatable)."""
    return Interventions(tuple(parse_ablation(a) for a in ablate or ()), tuple(parse_steer(s) for s in steer or ()),
                         tuple(parse_steer_vector(v) for v in steer_vector or ()))
