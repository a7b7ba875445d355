"""The Features page's job panel reads what a job does from its folder's files as data: progress
from events.jsonl (never its console text), failure reasons from status.json, a broken job
as unreadable; and a Stop never signals a process the job's status merely names."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from app_harness import open_app, texts

from core.interp import jobs as tjobs
from core.jobs.events import EventLog
from core.jobs.folder import StatusFile, mark
from core.jobs.process import process_start, this_host

PAGE = "pages/features.py"


def job_folder(root: Path, name: str, status: dict, action: str = "train") -> Path:
    folder = tjobs.jobs_root(root) / name
    folder.mkdir(parents=True)
    mark(folder, tjobs.JOB_KIND)
    (folder / "config.json").write_text(json.dumps({"kind": "transcoders", "action": action,
                                                    "argv": ["transcoders", action, "--model", "m"], "model": "m",
                                                    "output": str(root / "set")}))
    StatusFile(folder).update(**status)
    return folder


def test_the_job_panel_reads_progress_and_failures_as_data(env, tmp_path, tiny_gptlab_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_gptlab_dir, model)
    me = dict(state="running", pid=os.getpid(), pid_start=process_start(os.getpid()), host=this_host())
    live = job_folder(env, "20250101-000003-train", me)
    (live / "console.txt").write_text("train:  99%|#########| 99/100 [00:01<00:00]\n")  # never parsed
    failed = job_folder(env, "20250101-000002-collect",
                        dict(state="failed", reason="Corpus x.txt holds no text; point it at a file with some.",
                             fix={"dataset": "shakespeare"}), action="collect")
    broken = job_folder(env, "20250101-000001-describe", dict(state="finished"), action="describe")
    (broken / "status.json").write_text("{oops")

    at = open_app(PAGE, state={"model_spec": str(model)})
    assert not at.exception
    assert [p.proto.text for p in at.get("progress")] == ["starting…"]  # no progress event yet
    EventLog(live).progress("train", 9, 20, text="loss 1.5000")
    at.run()
    (bar,) = at.get("progress")
    assert bar.proto.text == "train: 9 / 20 · loss 1.5000" and bar.proto.value == 45
    errors = texts(at.error)
    assert "Job failed: Corpus x.txt holds no text; point it at a file with some." in errors
    assert any(e.startswith("Job unreadable: ") and "not valid JSON" in e for e in errors)
    assert tjobs.read_job(failed).fix == {"dataset": "shakespeare"}

    # Stop on a job whose status names this very process: the request is written, no signal is sent
    at.button(key=f"feat_j_stop_{live.name}").click().run()
    assert not at.exception and (live / "STOP").exists()
    assert tjobs.read_job(live).running and tjobs.read_job(live).stop_requested
