"""Training: data, schedules, optimisers, the trainer, masked diffusion, and run processes.

The library API in one place::

    from core.training import TrainConfig, train, launch, list_runs, stop, resume, delete

``train(cfg)`` runs in this process as a generator of events; ``launch(cfg)`` starts the same
trainer as a detached ``python -m core train`` process (through :mod:`core.jobs`) and returns at once.
"""
from ..lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, {
    **names(".config", "TrainConfig"),
    **names(".runs", "MetricsFollower", "RunInfo", "check_output_folder", "delete", "launch", "list_runs", "log_tail",
            "read_metrics", "read_previews", "read_status", "resume", "run_info", "run_path", "stop"),
    **names(".trainer", "CheckpointSaved", "Previewed", "RunEnded", "RunStarted", "StepLogged", "TrainEvent",
            "Validated", "resume_config", "train"),
})
