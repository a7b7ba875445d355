"""Consensus: iterate a model's layer stack and watch its token vectors converge.

- :mod:`.config`: the settings (``ConsensusConfig``, ``DecodeConfig``, ``SimulationConfig``), their
  defaults and choice lists.
- :mod:`.engine`: the walk, batched over prompts, events as it goes.
- :mod:`.metrics`: the statistics of a token cloud, on the device.
- :mod:`.results`: result arrays and events.
- :mod:`.files`: the reference scripts' ``.npy`` layouts.
- :mod:`.estimate`: what a run will cost (memory up front, time once its pace is measured).
- :mod:`.simulation`: the paper's continuous-time attention dynamics on the sphere.

``from core.consensus import ConsensusConfig, run_consensus, consensus_stream`` keeps working:
the names are loaded on first use.
"""
from ..lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, {
    **names(".config", "ConsensusConfig", "DecodeConfig", "SimulationConfig", "REINIT_MODES", "ENGINES",
            "DEFAULT_ITERATIONS", "DEFAULT_MEMORY_BUDGET", "MAX_MEMORY_BUDGET", "parse_iterations"),
    **names(".results", "ConsensusResult", "ConsensusDecodeResult", "MetricChunk", "Started", "Progress", "Decoded",
            "TokenSampled", "Finished", "ConsensusEvent", "STAT_NAMES"),
    **names(".engine", "consensus_stream", "run_consensus", "consensus_decode_stream", "consensus_decode",
            "random_prompt_ids", "estimate_bytes", "memory_plan", "MemoryPlan", "recorded_steps"),
    **names(".estimate", "RunEstimate", "estimate_run", "long_run_notice"),
    **names(".simulation", "simulation_stream", "run_simulation", "SimulationResult"),
})
