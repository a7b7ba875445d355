"""`python -m core serve`: its flags' defaults are ServeConfig's, --help loads neither torch nor
FastAPI, a real process serves and stops on Ctrl-C, and a taken port is one sentence."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from core.commands.cli import build_parser, main
from core.serve.config import ServeConfig, is_loopback
from tests.serve.helpers import client

ROOT = Path(__file__).resolve().parents[2]


def test_flag_defaults_are_the_configs():
    args = build_parser().parse_args(["serve"])
    d = ServeConfig()
    assert (args.host, args.port, args.api_key, args.model_name, args.max_queue, args.queue_timeout_s,
            args.log_level) == (d.host, d.port, None, None, d.max_queue, d.queue_timeout_s, d.log_level)
    assert d.host == "127.0.0.1" and is_loopback(d.host) and not is_loopback("0.0.0.0") and is_loopback("::1")
    assert "secret" not in repr(ServeConfig(api_key="secret"))


def test_importing_the_command_loads_no_engine():
    code = ("import sys, core.commands.serve, core.commands.transcoders; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_taken_port_is_one_sentence(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot listen on 127.0.0.1:{port}") and "--port" in err and err.count("\n") == 1


# The same shape as tests/commands/test_cli_bad_input.py's BAD_INPUTS: (argv, what the one line names).
BAD_INPUTS = [
    (["serve", "--port"], "--port"),
    (["serve", "--frobnicate"], "--frobnicate"),
    (["serve", "--port", "70000"], "--port must be between 0 and 65535"),
    (["serve", "--max-queue", "-1"], "--max-queue must be 0 or more"),
    (["serve", "--queue-timeout", "0"], "--queue-timeout must be above 0"),
    (["serve", "--log-level", "loud"], "--log-level"),
    (["serve", "--host", " "], "--host is empty"),
    (["serve", "--port", "0", "--model", "./no/such/model"], "--model"),
]


@pytest.mark.parametrize("argv, names", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, monkeypatch, capsys, argv, names):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert names in err and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in out + err
    assert list(tmp_path.iterdir()) == []


def test_the_command_serves_until_ctrl_c(tiny_gptlab_dir):
    env = {**os.environ, "GPTLAB_API_KEY": "k3y", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "core", "serve", "--model", str(tiny_gptlab_dir), "--port", "0",
                             "--log-level", "warning", "--served-model-name", "tiny"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the port bound
        assert line.startswith("serving tiny (gptlab") and "(API key required)" in line, proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        r = client(url, "k3y", max_retries=3).completions.create(model="tiny", prompt="ROMEO:", max_tokens=3,
                                                                  temperature=0)
        assert r.choices[0].finish_reason == "length"
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully, then the CLI's Ctrl-C exit code
        assert proc.wait(timeout=60) == 130
        out, err = proc.stdout.read(), proc.stderr.read()
        assert "interrupted (Ctrl-C)" in err and "Traceback" not in err and "k3y" not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
