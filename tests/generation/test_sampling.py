"""Each sampling filter's math on hand-made distributions."""
import math

import torch

from core.generation.sampling import (apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                           process_logits)


def _logits(probs):
    return torch.tensor([probs]).log()


def kept(logits):
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_keeps_k_largest():
    x = _logits([0.1, 0.4, 0.2, 0.3])
    assert kept(apply_top_k(x, 2)) == [1, 3]
    assert kept(apply_top_k(x, 0)) == [0, 1, 2, 3]


def test_top_p_smallest_nucleus():
    x = _logits([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_top_p(x, 0.5)) == [0]          # 0.5 reached by the top token alone
    assert kept(apply_top_p(x, 0.6)) == [0, 1]       # needs 0.8 mass
    assert kept(apply_top_p(x, 0.95)) == [0, 1, 2]
    assert kept(apply_top_p(x, 1.0)) == [0, 1, 2, 3]
    assert kept(apply_top_p(x, 1e-6)) == [0]         # never empty
    # renormalised probabilities of the kept tokens
    p = apply_top_p(x, 0.6).softmax(-1)[0]
    assert torch.allclose(p[:2], torch.tensor([0.5 / 0.8, 0.3 / 0.8]))


def test_min_p_relative_to_top():
    x = _logits([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_min_p(x, 0.5)) == [0, 1]       # threshold 0.25
    assert kept(apply_min_p(x, 0.2)) == [0, 1, 2]    # threshold 0.10


def test_temperature_scales_logits():
    x = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.equal(apply_temperature(x, 2.0), torch.tensor([[0.5, 1.0, 2.0]]))
    p_cold = apply_temperature(x, 0.5).softmax(-1)[0, 2]
    assert p_cold > x.softmax(-1)[0, 2]


def test_repetition_penalty_ctrl_rule():
    x = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(x, torch.tensor([[0, 1]]), 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0]]))


def test_process_order_top_k_before_top_p():
    x = _logits([0.4, 0.3, 0.2, 0.1])
    out = process_logits(x, torch.empty(1, 0, dtype=torch.long), top_k=3, top_p=0.75)
    # after top-k=3 renormalised: 0.444, 0.333, 0.222 -> nucleus 0.75 needs two tokens
    assert kept(out) == [0, 1]
    assert math.isclose(float(out.softmax(-1)[0, 0]), 0.4 / 0.7, rel_tol=1e-5)
