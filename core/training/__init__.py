"""Training: data, schedules, optimisers, the trainer, masked diffusion, and run processes.

The library API in one place::

    from core.training import TrainConfig, train, launch, list_runs, stop, resume, delete

``train(cfg)`` runs in this process as a generator of events; ``launch(cfg)`` starts the same
trainer as a detached ``python -m core train`` process and returns at once.
"""
from .config import TrainConfig
from .runs import (MetricsFollower, RunInfo, delete, launch, list_runs, log_tail, read_metrics, read_previews, read_status, resume,
                   run_info, stop)
from .trainer import (CheckpointSaved, Previewed, RunEnded, RunStarted, StepLogged, TrainEvent, Validated,
                      resume_config, train)

__all__ = ["TrainConfig", "train", "resume_config", "launch", "list_runs", "run_info", "read_status", "read_metrics",
           "read_previews", "MetricsFollower", "log_tail", "stop", "resume", "delete", "RunInfo", "TrainEvent", "RunStarted",
           "StepLogged", "Validated", "Previewed", "CheckpointSaved", "RunEnded"]
