"""The command line: ``python -m core <command>``, or ``gptlab <command>`` once the package is
installed (pyproject.toml's console script calls :func:`main`; help and errors name what was run).

Commands are discovered, not listed: every module in :mod:`core.commands` that exposes ``NAME``,
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` becomes a subcommand, so
adding a command never touches this file. The model flags are declared once here
(:func:`add_model_args`) and every command that loads a model reuses them with
:func:`load_from_args`, so ``--model``/``--device``/``--dtype`` mean the same thing everywhere.

Exit codes: 0 success, 1 a check failed (e.g. ``validate``), 2 a usage or input error (one line
on stderr, ``error: ...``), 130 interrupted with Ctrl-C.

Bad input costs one line, never a usage block or a traceback: argparse's own complaints go through
:class:`LabArgumentParser` (the root parser and, since argparse builds subparsers with the parent's
class, every subcommand), numeric flags check their range as they are parsed (:func:`int_arg`,
:func:`float_arg`, :func:`device_arg`), and what only ``run`` can judge raises
:class:`~core.errors.LabError`, which :func:`main` prints as one line.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
import decimal
import difflib
import importlib
import math
import os
import pkgutil
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TextIO, TypeVar

from .. import commands
from ..errors import LabError, failure, is_out_of_memory, one_line, shorten
from ..models.config import DEFAULT_DTYPE, DTYPE_NAMES

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

PROG = "python -m core"
CONSOLE_COMMAND = "gptlab"  # pyproject.toml's [project.scripts] entry: the same CLI, installed


def prog() -> str:
    """The name the user ran: ``gptlab`` (the installed command) or ``python -m core``."""
    return CONSOLE_COMMAND if Path(sys.argv[0] if sys.argv else "").name == CONSOLE_COMMAND else PROG

OUT_OF_MEMORY = "the device ran out of memory; use a smaller model or batch, --dtype bfloat16, or --device cpu."
T = TypeVar("T")


# A value that starts with "-" is taken for a flag unless it looks like a negative number. Before
# Python 3.14 argparse's rule knew only ``-1`` and ``-.5``, so ``--beta -1e30`` or ``--length-penalty
# -1_000`` failed with "expected one argument". This is the rule Python 3.14 adopted (anything
# starting with "-" and a digit, or "-." and a digit), stated once for every parser here; argparse
# applies it only while no option itself looks like a negative number, and none of ours does (every
# flag starts with "--" or a letter). The number itself is then checked by the flag's type.
NEGATIVE_NUMBER = re.compile(r"-\.?\d")


class LabArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line that names the flag and what to change; the usage
    block is one ``--help`` away, so it is not repeated under every typo. Negative numbers in any
    spelling (``-1e30``, ``-1_000``) are values, never flags (:data:`NEGATIVE_NUMBER`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER  # what argparse consults; see NEGATIVE_NUMBER

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {one_line(self._explain(message))} (see `{self.prog} --help`)\n")

    def _explain(self, message: str) -> str:
        """argparse's wording, reshaped to lead with the flag: ``argument --top-k/--top_k: invalid
        int value: 'x'`` becomes ``--top-k: invalid int value: 'x'; pass a whole number``."""
        m = re.match(r"argument (\S+): (.*)$", message, re.DOTALL)
        if m is None:
            unknown = re.match(r"unrecognized arguments: (.*)$", message, re.DOTALL)
            return self._unknown(unknown.group(1).split()) if unknown else message
        name, rest = m.group(1).split("/")[0], m.group(2)
        choice = re.match(r"invalid choice: (.*?) \(choose from (.*)\)$", rest, re.DOTALL)
        if choice and name.startswith("<"):  # a subcommand: <command> or <action>
            options = ", ".join(c.strip("'") for c in choice.group(2).split(", "))
            return f"unknown {name.strip('<>')} {choice.group(1)}; choose one of {options}"
        if rest.startswith("must "):  # our range checks (int_arg, float_arg)
            return f"{name} {rest}"
        hint = {"int": "; pass a whole number", "float": "; pass a number"}
        kind = re.match(r"invalid (int|float) value", rest)
        return f"{name}: {rest}{hint[kind.group(1)] if kind else ''}"

    def _unknown(self, words: list[str]) -> str:
        flags = [w for w in words if w.startswith("-")]
        if not flags:
            return f"unexpected argument {words[0]!r}; quote text that contains spaces"
        known = {o.lstrip("-"): o for a in self._actions for o in a.option_strings}
        close = difflib.get_close_matches(flags[0].split("=")[0].lstrip("-"), list(known), n=1, cutoff=0.75)
        guess = f"; did you mean {known[close[0]]}?" if close else "; drop it"
        return f"unknown flag {flags[0]}{guess}"


# -- argument types: ranges are checked while parsing, so the error names the flag -----------------

def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        if low_open:
            return f"must be above {low}"
        return "must be 0 or more" if low == 0 else f"must be at least {low}"
    if low is None:
        return f"must be below {high}" if high_open else f"must be at most {high}"
    if not (low_open or high_open) and isinstance(low, int) and isinstance(high, int):
        return f"must be between {low} and {high}"
    return f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _range_type(parse: Callable[[str], T], kind: str, low, high, low_open: bool, high_open: bool,
                note: str) -> Callable[[str], T]:
    def check(text: str) -> T:
        value = parse(str(text).strip())  # a ValueError here reads "invalid int value: 'x'"
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{_bounds(low, high, low_open, high_open)} (got {value}){note}")
        return value

    check.__name__ = kind  # argparse names the type in "invalid int value"
    return check


def whole_number(text: str) -> int:
    """``20_000``, ``1e9`` or ``2.5e3``: a whole number in any spelling that says one exactly
    (``1.5`` and ``1e-3`` are not; a ValueError, as ``int`` raises)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = decimal.Decimal(text)  # exact: 1e30 stays 10**30, never a float's neighbour
    except decimal.InvalidOperation:
        raise ValueError(text) from None
    if not value.is_finite() or value.adjusted() > 4300 or value != value.to_integral_value():
        raise ValueError(text)  # beyond 4300 digits: as int() refuses them (and far beyond any flag's range)
    return int(value)


def int_arg(low: int | None = None, high: int | None = None, note: str = "") -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in ``[low, high]`` (``20_000`` and ``1e9`` spellings
    work, :func:`whole_number`). ``note`` ends the message, e.g. ``"; 0 turns it off"``."""
    return _range_type(whole_number, "int", low, high, False, False, note)


def float_arg(low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False, note: str = "") -> Callable[[str], float]:
    """An argparse ``type`` for a finite number between ``low`` and ``high``; ``low_open`` /
    ``high_open`` exclude the bound itself (``float_arg(0, low_open=True)``: above 0)."""
    return _range_type(float, "float", low, high, low_open, high_open, note)


def trackers_arg(text: str) -> list[str]:
    """An argparse ``type`` for ``--log-to tensorboard,wandb,mlflow`` (core.training.config.TRACKERS);
    whether each tracker's package is installed is checked with the rest of the config."""
    from ..training.config import parse_trackers

    try:
        return parse_trackers(text)
    except LabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def path_arg(text: str) -> str:
    """An argparse ``type`` for every flag that names a file, folder or model spec: the text is
    kept as typed, but a name no file system takes (a part longer than it allows) fails while
    parsing, naming the flag, instead of as an OSError wherever the path is first looked up.
    (An empty value is refused for every flag alike, by :func:`empty_value`.)"""
    from ..files import name_too_long  # numpy comes with it; looked up only when a path flag is given

    long = name_too_long(text) if str(text).strip() else None
    if long is not None:
        raise argparse.ArgumentTypeError(f"must be a name the file system takes: {long}; use a shorter name")
    return text


# Flags whose empty value has a sentence of its own, said before any work (an empty prompt).
OWN_EMPTY_SENTENCE = frozenset({"prompt", "gen_prompt"})


def empty_value(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """A sentence for the first flag given an empty (or blank) value, or None. An empty name is
    never a name: left to each command, ``--store ''`` quietly meant "the default store",
    ``--api-key ''`` "no key" and ``--json ''`` a file called ``.json``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            found = empty_value(chosen, args) if chosen is not None else None
            if found:
                return found
            continue
        if action.dest in OWN_EMPTY_SENTENCE or action.nargs == 0:
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is action.default or not any(isinstance(v, str) and not v.strip() for v in values):
            continue
        flag = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        return (f"{flag} is empty; give it a value or leave it out (see `{parser.prog} --help`)")
    return None


DEVICE_HINT = "use cpu, cuda, cuda:N or auto"


def device_arg(text: str) -> str:
    """An argparse ``type`` for ``--device``: the spelling is checked here, whether the device
    exists when the model loads (:func:`core.devices.resolve_device`)."""
    d = str(text).strip().lower()
    if d in ("cpu", "cuda", "auto") or (d.startswith("cuda:") and d[5:].isdigit()):
        return str(text).strip()
    raise argparse.ArgumentTypeError(f"Unknown device '{text}'; {DEVICE_HINT}")


# -- discovery ----------------------------------------------------------------------------------

def command_modules() -> list[ModuleType]:
    """Every command module in :mod:`core.commands`, sorted by command name."""
    mods = []
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        if all(hasattr(mod, a) for a in ("NAME", "HELP", "add_arguments", "run")):
            mods.append(mod)
    return sorted(mods, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    mods = command_modules()
    name = prog()
    parser = LabArgumentParser(prog=name, usage=f"{name} <command> [flags]",
                               description="GPT Lab: generate, validate, explore consensus, train and interpret "
                                           "GPT-style models from the command line.",
                               epilog=commands_table(mods, name), formatter_class=argparse.RawDescriptionHelpFormatter)
    # argparse would wrap each command's help over several lines; the epilog lists them one a line
    sub = parser.add_subparsers(dest="command", metavar="<command>", help=argparse.SUPPRESS, prog=name)
    for mod in mods:
        p = sub.add_parser(mod.NAME, description=_description(mod),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def commands_table(mods: Sequence[ModuleType], name: str = PROG) -> str:
    """``--help``'s list of commands: one line each (the module's HELP), then how to learn more."""
    width = max(len(m.NAME) for m in mods)
    rows = [f"  {m.NAME:<{width}}  {one_line(m.HELP)}" for m in mods]
    return "\n".join(["commands:", *rows, "", f"Run `{name} <command> --help` for a command's flags and examples."])


def _description(mod: ModuleType) -> str:
    doc = (mod.__doc__ or "").strip()
    return f"{mod.HELP}\n\n{doc}" if doc and doc != mod.HELP else mod.HELP


def main(argv: Sequence[str] | None = None, on_error: Callable[[BaseException], None] | None = None) -> int:
    """Parse ``argv`` and run the command; always returns the exit code (never raises SystemExit).
    ``on_error`` sees the exception a command failed with before it becomes a line (a detached job
    records it, with a LabError's ``fix``, in its events file)."""
    bad = _not_utf8(sys.argv[1:] if argv is None else argv)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the (sub)command's parser, so the hint names the right --help
            _deepest_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    empty = empty_value(parser, args)
    if empty:
        print(f"error: {empty}", file=sys.stderr)
        return 2
    if getattr(args, "run", None) is None:
        names = ", ".join(m.NAME for m in command_modules())
        print(f"error: name a command: {names} (see `{prog()} --help`)", file=sys.stderr)
        return 2
    try:
        try:
            return int(args.run(args) or 0)
        except Exception as e:
            if on_error is not None:
                on_error(e)
            raise
    except LabError as e:
        _flush_stdout()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly like other Unix tools
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except KeyboardInterrupt:
        _flush_stdout()
        print("\ninterrupted (Ctrl-C).", file=sys.stderr)
        return 130
    except Exception as e:
        _flush_stdout()
        if is_out_of_memory(e):
            print(f"error: {failure(e, OUT_OF_MEMORY)}", file=sys.stderr)
            return 2
        if os.environ.get("GPTLAB_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {one_line(e)[:300]} (a bug in GPT Lab; rerun with "
              f"GPTLAB_DEBUG=1 for the traceback and report it).", file=sys.stderr)
        return 1


def _not_utf8(argv: Sequence[str]) -> str | None:
    """A sentence for the first argument holding bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which no tokenizer or file name takes), or None."""
    for arg in argv:
        try:
            str(arg).encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(str(arg)[e.start]) & 0xFF
            return (f"the argument '{shorten(str(arg).encode('utf-8', 'replace').decode(), 40)}' is not UTF-8 text "
                    f"(byte 0x{byte:02x}); type it as UTF-8 or pipe the text on stdin.")
    return None


def _deepest_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` chose: ``transcoders train``'s, say."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _deepest_parser(chosen, args)
    return parser


def read_stdin(what: str, stdin: TextIO | None = None) -> str | None:
    """All of stdin as text (line breaks as ``\\n``), or ``None`` when there is no stdin; a note
    on a terminal says how to end. Bytes that are not UTF-8 are a :class:`LabError` naming the
    first bad byte, not a traceback."""
    stdin = sys.stdin if stdin is None else stdin
    if stdin is None:
        return None
    if stdin.isatty():
        print(f"Reading {what} from stdin (end with Ctrl-D)...", file=sys.stderr)
    buffer = getattr(stdin, "buffer", None)
    try:
        text = buffer.read().decode("utf-8") if buffer is not None else stdin.read()
    except UnicodeDecodeError as e:
        raise LabError(f"stdin is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); pipe UTF-8 "
                       f"text, e.g. through `iconv -t UTF-8`.") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


# -- progress -----------------------------------------------------------------------------------

ProgressListener = Callable[[str, int, "int | None", "str | None"], None]
_LISTENERS: list[ProgressListener] = []


@contextmanager
def progress_listener(listener: ProgressListener) -> Iterator[None]:
    """While the block runs, every bar drawn by :func:`progress` also calls ``listener(stage, done,
    total, text)`` when it moves: how a detached job turns its bars into progress events."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def progress(events: Iterable[T], total: int | None, desc: str = "", *,
             position: Callable[[T], int | None] | None = None,
             status: Callable[[T], str | None] | None = None) -> Iterator[T]:
    """Pass ``events`` through unchanged while drawing a progress bar on stderr.

    Each event moves the bar one step, unless ``position(event)`` gives the absolute count (a
    training step, say) or ``None`` (the event does not move it). ``status(event)`` may give a
    short text shown after the bar (a loss). Stopping early (``break``, ``close()``) closes
    ``events`` as well, so the long job behind it stops with its consumer.
    """
    it = iter(events)
    bar = _Bar(total, desc)
    try:
        for ev in it:
            pos = position(ev) if position is not None else bar.n + 1
            text = status(ev) if status is not None else None
            bar.update(pos, text)
            if pos is not None:
                for listener in _LISTENERS:
                    listener(desc or "progress", bar.n, total, text)
            yield ev
    finally:
        bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()


def bar_note(text: str) -> None:
    """Print ``text`` as a line of its own on stderr while a :func:`progress` bar runs (tqdm redraws
    the bar below it; the plain bar is ended by a newline first, and redrawn on its next move)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        sys.stderr.write("\n" + text + "\n")
        sys.stderr.flush()
        return
    tqdm.write(text, file=sys.stderr)


class _Bar:
    """tqdm when it is installed (it comes with huggingface_hub), else a plain ``\\r`` line."""

    def __init__(self, total: int | None, desc: str):
        self.n = 0
        try:  # optional: tqdm comes with huggingface_hub, but a plain line does without it
            from tqdm.auto import tqdm
        except ImportError:
            self._tqdm = None
            self.total, self.desc, self._last = total, desc, 0.0
        else:
            self._tqdm = tqdm(total=total, desc=desc or None, file=sys.stderr, dynamic_ncols=True,
                              mininterval=0.2, leave=True)

    def update(self, pos: int | None, text: str | None) -> None:
        if pos is not None:
            delta, self.n = pos - self.n, pos
            if self._tqdm is not None:
                self._tqdm.update(delta)
        if self._tqdm is not None:
            if text:
                self._tqdm.set_postfix_str(text, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= 0.2 or (self.total is not None and self.n >= self.total):
            self._last = now
            self._draw(text)

    def _draw(self, text: str | None) -> None:
        if self.total:
            frac = min(1.0, self.n / self.total)
            fill = int(round(30 * frac))
            line = f"{self.desc} |{'#' * fill}{'-' * (30 - fill)}| {self.n}/{self.total}"
        else:
            line = f"{self.desc} {self.n}"
        sys.stderr.write("\r" + line.strip() + (f"  {text}" if text else ""))
        sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._draw(None)
            sys.stderr.write("\n")
            sys.stderr.flush()


# -- shared model flags ---------------------------------------------------------------------------

def add_device_arg(parser: argparse.ArgumentParser, default: str = "auto", sharded: bool = True) -> None:
    auto = ("the first GPU when there is one, else cpu; Hugging Face models are spread over all GPUs"
            if sharded else "the first GPU when there is one, else cpu")
    parser.add_argument("--device", default=default, type=device_arg, metavar="DEVICE",
                        help=f"cpu, cuda, cuda:N, or auto ({auto}) (default: %(default)s)")


TRUST_REMOTE_CODE_WARNING = ("warning: --trust-remote-code runs Python code shipped with the model, with your "
                             "permissions; use it only for models whose authors you trust.")


def add_trust_remote_code_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The one switch that lets transformers run a model repository's own Python code (off unless given)."""
    parser.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                        help="let transformers run Python code shipped with a Hugging Face model or tokenizer "
                             "(needed by models with custom code; never on by default)")


def remote_code_allowed(args: argparse.Namespace) -> bool:
    """``--trust-remote-code`` as given; when set, one warning line on stderr before anything loads."""
    trusted = bool(getattr(args, "trust_remote_code", False))
    if trusted:
        print(TRUST_REMOTE_CODE_WARNING, file=sys.stderr)
    return trusted


class GivenAction(argparse.Action):
    """Stores the value and records that the flag was typed (``args.<dest>_given``): a default
    that only applies when the user named no model (``data/gpt2_weights.pt``) needs to know."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def model_given(args: argparse.Namespace) -> bool:
    """Whether ``--model`` was on the command line (its default does not count)."""
    return bool(getattr(args, "model_given", False))


# The reference scripts' architecture flags -> the model's own sizes (LayerStack.describe()).
ARCHITECTURE_FLAGS = (("num_layers", "n_layer", "layers"), ("num_heads", "n_head", "attention heads"),
                      ("model_dim", "d_model", "width"), ("max_seq_len", "context_length", "context"))


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "default") -> None:
    """The model flags every model-using command shares, including the reference scripts' spellings."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default_model, metavar="SPEC", action=GivenAction, type=path_arg,
                   help="default (the shipped GPT; diffusion: the shipped masked-diffusion LM, where installed), a hub id (gpt2, "
                        "EleutherAI/gpt-neo-125M), a local Hugging Face folder, or a GPT Lab checkpoint folder; "
                        "with a bare state dict (--weights/--ckpt) it names the architecture (default: %(default)s)")
    add_device_arg(g)
    g.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_NAMES, help="(default: %(default)s)")
    g.add_argument("--tokenizer", "--tokenizer-path", dest="tokenizer", metavar="PATH", type=path_arg,
                   help="use this tokenizer instead of the model's own: a tokenizer.json, a model folder, "
                        "tiktoken:gpt2, or a hub id")
    g.add_argument("--checkpoint", "--ckpt", dest="checkpoint", metavar="PATH", type=path_arg,
                   help="load this instead of --model: a GPT Lab checkpoint or run folder (its latest "
                        "checkpoint), a Hugging Face folder, or a bare GPT-2 state dict (.pt/.safetensors); "
                        "a missing X.pt falls back to the folder X/ that train --ckpt-name X.pt exports")
    g.add_argument("--weights", metavar="FILE|auto", type=path_arg,
                   help="a bare GPT-2 state dict (.pt/.safetensors) with the sizes implied by --model; "
                        "'auto' loads the model --model names")
    g.add_argument("--source", choices=("pretrained", "local"),
                   help="pretrained: load --model; local: load --ckpt/--checkpoint (reference-script spelling)")
    g.add_argument("--model-version", choices=("gpt2", "gpt3"),
                   help="accepted for compatibility with the reference generate.py and has no effect: "
                        "GPT Lab checkpoints carry their own config")
    add_trust_remote_code_arg(g)
    r = parser.add_argument_group(
        "reference-script spellings (diffusion-interpretability.md)",
        "  --train_folder RUN --checkpoint_name state_step020000.pt loads RUN/checkpoints/20000;\n"
        "  the sizes are checked against the checkpoint, which carries its own config.")
    r.add_argument("--train_folder", metavar="DIR", type=path_arg,
                   help="a run folder: loads its checkpoint --checkpoint_name (default: its newest)")
    r.add_argument("--checkpoint_name", metavar="NAME", type=path_arg,
                   help="a checkpoint of --train_folder: state_step020000.pt (checkpoint 20000), a step number, "
                        "or a folder or weights file inside the run folder")
    r.add_argument("--cuda", type=int_arg(0), metavar="N", help="GPU index: same as --device cuda:N")
    for flag, _, what in ARCHITECTURE_FLAGS:
        r.add_argument(f"--{flag}", type=int_arg(1), metavar="N",
                       help=f"the model's {what}: must match its config (an error names the difference)")


def latest_checkpoint(path: Path) -> Path:
    """A run folder (``runs/<id>``) stands for its newest checkpoint; any other path is itself."""
    from ..models.loading import is_gptlab_folder  # the engine (torch): loaded when a model loads, not for --help

    ckpts = path / "checkpoints"
    if path.is_dir() and ckpts.is_dir() and not is_gptlab_folder(path):
        steps = [p for p in ckpts.iterdir() if p.is_dir() and is_gptlab_folder(p)]
        if not steps:
            raise LabError(f"Run folder {path} has no checkpoint yet; train longer or pick another run.")
        return max(steps, key=lambda p: (int(p.name) if p.name.isdigit() else -1, p.name))
    return path


def resolve_reference_model(train_folder: str, checkpoint_name: str | None) -> tuple[str, str | None]:
    """``(model spec, bare state-dict file or None)`` for the reference scripts' ``--train_folder``
    and ``--checkpoint_name``: their ``state_step020000.pt`` is our ``checkpoints/20000/``."""
    folder = Path(train_folder).expanduser()
    if not folder.exists():
        raise LabError(f"--train_folder {folder} does not exist; pass the run folder the model was trained in.")
    if not checkpoint_name:
        return str(latest_checkpoint(folder)), None
    direct = folder / checkpoint_name
    if direct.is_dir():
        return str(direct), None
    if direct.is_file():
        return "default", str(direct)
    m = re.search(r"(\d+)", Path(checkpoint_name).stem)
    if m:
        step = int(m.group(1))
        for cand in (folder / "checkpoints" / str(step), folder / "checkpoints" / m.group(1)):
            if cand.is_dir():
                return str(cand), None
    raise LabError(f"No checkpoint '{checkpoint_name}' in {folder}; name a folder under {folder / 'checkpoints'} "
                   f"(e.g. its step number) or a weights file in {folder}.")


REFERENCE_WEIGHTS = Path("data") / "gpt2_weights.pt"


def use_reference_weights(args: argparse.Namespace) -> bool:
    """gpt2-reproduction.md: "If you keep data/gpt2_weights.pt in place, both commands default to it
    automatically." So ``generate`` and ``validate`` with no ``--model`` and nothing else naming
    weights load that file (relative to the working folder) when it exists, and say so on stderr;
    ``--weights auto`` or any ``--model`` opts out. Returns whether it applied (``args.weights`` is set)."""
    named = (model_given(args) or getattr(args, "weights", None) or getattr(args, "checkpoint", None)
             or getattr(args, "train_folder", None) or getattr(args, "source", None) == "local")
    if named or not REFERENCE_WEIGHTS.is_file():
        return False
    args.weights = str(REFERENCE_WEIGHTS)
    print(f"note: loading {REFERENCE_WEIGHTS}, which gpt2-reproduction's scripts used whenever it was present; "
          f"pass --model or --weights auto to load something else.", file=sys.stderr)
    return True


def _device_from_args(args: argparse.Namespace) -> str:
    """``--device``, or ``cuda:N`` for the reference ``--cuda N`` (written back to ``args.device``)."""
    device = getattr(args, "device", "cpu") or "cpu"
    cuda = getattr(args, "cuda", None)
    if cuda is not None:
        if device.strip().lower() not in ("auto", f"cuda:{cuda}"):
            raise LabError(f"--cuda {cuda} and --device {device} name different devices; pass only one of them.")
        device = args.device = f"cuda:{cuda}"
    return device


def _model_from_args(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(model spec, file or folder to load instead, or None)`` from --model, --checkpoint/--ckpt,
    --weights, --source and the reference --train_folder/--checkpoint_name."""
    spec = getattr(args, "model", "default") or "default"
    checkpoint = getattr(args, "checkpoint", None)
    weights = getattr(args, "weights", None)
    source = getattr(args, "source", None)
    train_folder, checkpoint_name = getattr(args, "train_folder", None), getattr(args, "checkpoint_name", None)
    if weights is not None and weights.strip().lower() == "auto":
        weights = None
    if checkpoint and weights and Path(checkpoint) != Path(weights):
        raise LabError("Both --ckpt/--checkpoint and --weights name a file; pass only one of them.")
    if checkpoint_name and not train_folder:
        raise LabError("--checkpoint_name needs --train_folder (the run folder it belongs to).")
    if train_folder:
        other = "--model" if model_given(args) else "--ckpt/--checkpoint" if checkpoint else \
            "--weights" if weights else None
        if other:
            raise LabError(f"--train_folder and {other} both name the model; pass only one of them.")
        spec, file = resolve_reference_model(train_folder, checkpoint_name)
        args.model = spec
        if file is None:
            return spec, None
        checkpoint = file
    file = checkpoint or weights
    if source == "local" and not file:
        raise LabError("--source local loads a local checkpoint; pass it with --ckpt PATH.")
    if source == "pretrained" and checkpoint:
        raise LabError("--source pretrained loads --model, but --ckpt was given too; use --source local "
                       "for a checkpoint or drop --ckpt.")
    return spec, file


def _existing(file: str, is_checkpoint: bool) -> Path:
    """The path to load. gpt-training-suite's ``--checkpoint checkpoints/gpt3-mini.pt`` names the file
    its train.py wrote; ``train --ckpt-name gpt3-mini.pt`` writes the folder ``checkpoints/gpt3-mini/``,
    so a missing ``X.pt`` checkpoint falls back to the GPT Lab folder ``X/`` (nothing else changes:
    an existing ``X.pt`` still loads as a state dict, and ``--weights`` never falls back)."""
    from ..models.loading import is_gptlab_folder  # the engine (torch): loaded when a model loads, not for --help

    path = Path(file).expanduser()
    if path.exists():
        return path
    folder = path.with_suffix("")
    if is_checkpoint and path.suffix == ".pt" and folder.is_dir() and (
            is_gptlab_folder(folder) or (folder / "checkpoints").is_dir()):
        print(f"note: {path} does not exist; loading the GPT Lab folder {folder}/ (train --ckpt-name exports "
              f"a folder, not a .pt file).", file=sys.stderr)
        return folder
    raise LabError(f"Checkpoint {path} does not exist; check the path.")


def check_architecture(lm: "LoadedModel", args: argparse.Namespace) -> None:
    """The reference scripts built the model from --num_layers/--num_heads/--model_dim/--max_seq_len;
    here the checkpoint carries its config, so those flags can only agree with it or be a mistake."""
    d = lm.stack.describe()
    wrong = [f"--{flag} {getattr(args, flag)} (it has {d[key]})" for flag, key, _ in ARCHITECTURE_FLAGS
             if getattr(args, flag, None) is not None and getattr(args, flag) != d[key]]
    if wrong:
        raise LabError(f"The sizes given do not match {lm.name}: {', '.join(wrong)}; drop those flags (the "
                       f"checkpoint carries its own config) or pick the checkpoint they describe.")


def load_from_args(args: argparse.Namespace) -> "LoadedModel":
    """The model the shared flags describe (see :func:`add_model_args`), checked against any
    reference architecture flags."""
    # the engine (torch) is imported when a model loads, so that building the parser (--help) stays fast
    from ..devices import resolve_device
    from ..models.loading import load_model
    from ..models.statedict import load_state_dict_model

    device = _device_from_args(args)
    if device.strip().lower() != "auto":
        resolve_device(device)  # an unknown or missing device fails before any loading
    dtype = getattr(args, "dtype", DEFAULT_DTYPE)
    tokenizer = getattr(args, "tokenizer", None)
    spec, file = _model_from_args(args)
    trusted = remote_code_allowed(args)
    if not file:
        lm = load_model(spec, device=device, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trusted)
    else:
        path = _existing(file, is_checkpoint=file != getattr(args, "weights", None))
        if path.is_dir():
            lm = load_model(str(latest_checkpoint(path)), device=device, dtype=dtype, tokenizer=tokenizer,
                            trust_remote_code=trusted)
        else:
            lm = load_state_dict_model(path, spec, device=device, dtype=dtype, tokenizer=tokenizer)
    check_architecture(lm, args)
    return lm
