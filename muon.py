"""Muon: an optimizer for hidden weight matrices, with AdamW for every other parameter
(model.GPT.configure_optimizer)."""

import torch


def orthogonalize(update, steps=5):
    """Approximately the semi-orthogonal matrix nearest to `update` (U V^T of its SVD), by a quintic
    Newton-Schulz iteration in bf16 whose coefficients (Keller Jordan's) drive every singular value
    towards 1 in a few steps."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)  # every singular value <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for groups marked `muon`: Nesterov momentum, then the update orthogonalised
    and scaled by sqrt(max(1, rows / cols)); plain AdamW for the other groups. Weight decay is decoupled
    (scaled by the lr) in both. One optimizer, so the loop and the checkpoints treat it like AdamW."""

    def __init__(self, groups, lr, betas, momentum=0.95, eps=1e-8):
        super().__init__(groups, {"lr": lr, "betas": betas, "momentum": momentum, "eps": eps, "muon": False,
                                  "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "Muon takes no closure"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    (self._muon_step if group["muon"] else self._adamw_step)(p, group, self.state[p])

    @staticmethod
    def _muon_step(p, group, state):
        momentum = state.setdefault("momentum_buffer", torch.zeros_like(p))
        momentum.lerp_(p.grad, 1 - group["momentum"])
        update = orthogonalize(p.grad.lerp(momentum, group["momentum"]))
        p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    @staticmethod
    def _adamw_step(p, group, state):
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** step))
