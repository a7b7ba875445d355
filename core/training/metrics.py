"""Throughput facts: model FLOPs per token, GPU peak FLOPs, MFU, memory use and a memory estimate.

MFU follows the PaLM paper's accounting (appendix B): 6 FLOPs per parameter per token for the
forward and backward matmuls, plus 12 * n_layer * d_model * context for attention scores,
against the GPU's dense bfloat16/float16 tensor-core peak.
"""
from __future__ import annotations

import torch

# Dense (no sparsity) bfloat16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets; float16 for
# GPUs without bfloat16 (V100, T4). Matched as substrings of torch.cuda.get_device_name(),
# longest name first, so "H100 PCIe" wins over "H100" and "L40S" over "L4".
PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0, "B100": 1750.0,
    "GH200": 989.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0,
    "A100": 312.0, "A800": 312.0, "A40": 149.7, "A30": 165.0, "A10G": 70.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "RTX 6000 Ada": 364.0, "RTX A6000": 154.8, "RTX 5090": 209.5, "RTX 4090": 165.2, "RTX 3090": 71.0,
    "V100": 125.0, "T4": 65.0,
}


def peak_flops(device: str | torch.device) -> float | None:
    """The device's peak FLOP/s, or None on the CPU and on GPUs not in the table."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def flops_per_token(n_params: int, n_layer: int, d_model: int, context: int) -> float:
    """Training FLOPs per token (forward + backward); ``n_params`` without position embeddings."""
    return 6.0 * n_params + 12.0 * n_layer * d_model * context


def mfu(tokens_per_s: float, flops_token: float, peak: float | None, n_devices: int = 1) -> float | None:
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_token / (peak * n_devices)


def gpu_memory_gb(device: str | torch.device) -> float | None:
    """Peak memory this process allocated on the GPU so far, in GB (None on the CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / 1e9


def estimate_training_bytes(n_params: int, *, batch_size: int, context: int, n_layer: int, d_model: int,
                            vocab_size: int, amp: bool, optimizer_states: int = 2) -> int:
    """A deliberately rough upper estimate of training memory on one GPU.

    Weights, gradients and optimizer moments in float32 (4 bytes each), activations as in
    Korthikanti et al. 2022 (about 34 * d_model bytes per token per layer at 16 bits, doubled
    in float32; flash attention removes the quadratic term), plus the logits and their
    gradient in float32.
    """
    states = n_params * 4 * (2 + optimizer_states)
    tokens = batch_size * context
    act_per_token_layer = 34 * d_model * (1 if amp else 2)
    activations = tokens * n_layer * act_per_token_layer
    logits = tokens * vocab_size * (4 * 2 + (2 if amp else 0))
    return int(states + activations + logits)
