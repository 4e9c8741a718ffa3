"""The mitigation methods of the paper, each a few lines.

A method is up to three hooks on the output layer:
  transform_logits(logits)    -> the model's output logits (softcap: set `cap`)
  loss_term(lse, E)           -> an extra term that only enters the backward pass (zloss, muloss);
                                 lse is the logsumexp of each position's output logits
  after_step(E)               -> an in-place change after each optimizer step (mucentering)
The logged and evaluated loss is always the plain cross-entropy of the output logits.
A new method is a subclass here plus its registry entry (name, hyper-parameters, run-id code) in
trainer/contract.py METHODS; the constructor takes the hyper-parameters in the registry's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import field_name
from trainer.contract import METHODS, check_implements
from trainer.ops.cross_entropy import lse_and_target_reference, output_lse_and_target, softcap


class Method:
    name = "baseline"
    cap: float | None = None  # logits <- cap * tanh(logits / cap), applied inside the loss kernels

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.cap)

    def loss_term(self, lse: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def after_step(self, embedding: torch.Tensor) -> None:
        pass

    def loss(self, h: torch.Tensor, targets: torch.Tensor, embedding: torch.Tensor):
        """(cross-entropy to log, loss to minimise) of the logits h E^T, from each position's
        logsumexp and target logit (fp32, computed by trainer.ops.cross_entropy)."""
        if type(self).transform_logits is Method.transform_logits:
            lse, target_logit = output_lse_and_target(h, embedding, targets, self.cap)
        else:  # a transform of its own, which the kernel does not know: plain PyTorch
            logits = self.transform_logits(F.linear(h, embedding).float())
            lse, target_logit = lse_and_target_reference(logits, targets, cap=None)
        ce = (lse - target_logit).mean()
        term = self.loss_term(lse, embedding)
        return ce, ce if term is None else ce + term


class ZLoss(Method):
    """lambda * mean over positions of (logsumexp_j l_j)^2."""

    name = "zloss"

    def __init__(self, lam: float):
        self.lam = lam

    def loss_term(self, lse, embedding):
        return self.lam * lse.square().mean()


class MuLoss(Method):
    """lambda * ||mu||^2, mu the row mean of E over all V rows (padding rows included)."""

    name = "muloss"

    def __init__(self, lam: float):
        self.lam = lam

    def loss_term(self, lse, embedding):
        return self.lam * embedding.float().mean(dim=0).square().sum()


class MuCentering(Method):
    """After every optimizer step, subtract mu from every row of E."""

    name = "mucentering"

    @torch.no_grad()
    def after_step(self, embedding):
        embedding.sub_(embedding.mean(dim=0, keepdim=True))


class SoftCap(Method):
    """logits <- c * tanh(logits / c) before the loss."""

    name = "softcap"

    def __init__(self, cap: float):
        self.cap = cap


IMPLEMENTATIONS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Method, ZLoss, MuLoss, MuCentering, SoftCap)
}
check_implements("methods", IMPLEMENTATIONS, METHODS)


def build_method(cfg) -> Method:
    """The method of a MethodConfig (None: baseline)."""
    if cfg is None:
        return Method()
    params = (getattr(cfg, field_name(p.key)) for p in METHODS[cfg.name].params)
    return IMPLEMENTATIONS[cfg.name](*params)
