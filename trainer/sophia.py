"""Sophia-G (Liu et al. 2023): written here, see SophiaG's docstring for why."""

from __future__ import annotations

import torch


class SophiaG(torch.optim.Optimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimate (Liu et al. 2023, "Sophia-G").

    Written here because no maintained library has it: pytorch-optimizer has SophiaH only, which
    estimates the Hessian by Hutchinson products from a create_graph backward at steps of its own,
    and clips m / h at p where Sophia-G clips m / (rho h) at 1.

    Per step, with decoupled decay: p <- p (1 - lr wd); m <- beta1 m + (1 - beta1) g;
    p <- p - lr sign(m) min(|m| / (rho h + 1e-15), 1). Every hessian_interval steps the training
    loop calls update_hessian() with .grad holding the gradient g_s of the batch-mean
    cross-entropy against labels sampled from the model's own softmax (OptimizerHooks.after_step):
    h <- beta2 h + (1 - beta2) B g_s^2, B the tokens of the batch (the GNB estimate B g_s^2; the
    reference code stores the EMA of g_s^2 and multiplies by B in the step, the same up to rounding).
    Before the first estimate h is 0: every update is clipped to lr sign(m).
    """

    def __init__(
        self, params, lr, betas: tuple[float, float], rho: float, batch_tokens: int, hessian_interval: int
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "rho": rho, "weight_decay": 0.0})
        self.batch_tokens, self.hessian_interval = batch_tokens, hessian_interval

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    h = self._state(p)["hessian"]
                    h.mul_(beta2).addcmul_(p.grad, p.grad, value=(1 - beta2) * self.batch_tokens)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta1, rho = group["lr"], group["betas"][0], group["rho"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                m = state["exp_avg"]
                p.mul_(1 - lr * group["weight_decay"])
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (m.abs() / (rho * state["hessian"] + 1e-15)).clamp_(max=1.0)
                p.addcmul_(m.sign(), ratio, value=-lr)


def sample_from_softmax(logits: torch.Tensor) -> torch.Tensor:
    """One label per row of logits, drawn from their softmax (the labels of the GNB estimate)."""
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(-1)
