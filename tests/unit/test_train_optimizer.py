"""Training uses ``torch.optim.AdamW`` with the settings of the update it replaced.

The reference below is Adam with decoupled weight decay as training had it written out (weight
decay scaled by the step's rate, betas 0.9/0.999, eps 1e-8 added after the bias-corrected square
root); ``fit`` builds torch's optimizer the same way and sets each step's rate in its param groups.
"""

from __future__ import annotations

import math

import torch

from models.train import TrainConfig, learning_rate


def _reference_steps(param: torch.Tensor, grads: list[torch.Tensor], rates: list[float], wd: float):
    b1, b2, eps = 0.9, 0.999, 1e-8
    p, m, v = param.clone(), torch.zeros_like(param), torch.zeros_like(param)
    for t, (g, lr) in enumerate(zip(grads, rates, strict=True), start=1):
        p.mul_(1 - lr * wd)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, (v / (1 - b2**t)).sqrt_().add_(eps), value=-lr / (1 - b1**t))
    return p


def test_torch_adamw_with_the_schedule_matches_the_decoupled_update():
    config = TrainConfig(lr=6e-3, weight_decay=0.05)  # a large decay, so a wrong mapping shows
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen) * (0.1 + k) for k in range(40)]
    rates = [learning_rate(config, step, len(grads)) for step in range(len(grads))]
    assert rates[0] < rates[5] and math.isclose(max(rates), config.lr, rel_tol=0.01)

    param = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW(
        [param], lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
    )
    for g, lr in zip(grads, rates, strict=True):
        param.grad = g.clone()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()

    want = _reference_steps(start, grads, rates, config.weight_decay)
    torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(want, start)
