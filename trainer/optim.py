"""Optimizers (their names and hyper-parameters: trainer/contract.py OPTIMIZERS).

Parameters are grouped by role (contract.PARAM_ROLES): `embedding` (the input embedding of an
untied model), `head` (the output embedding E; with tying the shared matrix), `matrix` (every
other tensor of dim >= 2), `vector` (norm weights). Each role's peak lr is optim.lr x
optim.<role>_lr_scale; the schedule (trainer/schedules.py) gives the lr of optim.lr at each step
and every group follows it in proportion, so optimizers and parametrisations with per-group rates need no
special case. Weight decay applies to tensors of dim >= 2.

Each registry name has a builder here (BUILDERS: model, OptimConfig, device, RunShape -> an
optimizer whose param_groups keep those keys: lr, lr_scale, weight_decay, role) and, where the
training loop must do more than step and zero_grad, its hooks (HOOKS, an `OptimizerHooks`): the
loop calls every hook of every optimizer, and the defaults do nothing.

The shared optim.beta1, beta2, eps and weight_decay mean the same for every optimizer that has
them (eps: the term added to the root of the second moment); the benchmark of Semenov,
Pagliardini and Jaggi (2025) tunes some of them per optimizer instead (its ADOPT eps 1e-6, its
MARS betas 0.95, 0.99): set them in the run config to match it.

The fused QKV matrix (model.Attention.qkv, 3H x H): Muon orthogonalises it whole, as the
benchmark does with its fused c_attn. Its update is then U V^T of the 3H x H momentum (singular
values ~1), scaled by sqrt(3) (muon) or 0.2 sqrt(3H) (dmuon), which gives it the update RMS of a
square matrix. Split into q, k and v (as modded-nanogpt does) each block would be orthogonalised
on its own, so the three would move by equal spectral amounts whatever the scale of their
gradients; whole, the q, k and v blocks share one spectrum. We keep it whole: it is what the
benchmark whose optimizers we reproduce does, torch.optim.Muon takes 2-D parameters only (a split
would need a Muon of our own), and our attention has a single q/k/v Linear by design.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from trainer.config import OptimConfig, check_one_step_size
from trainer.contract import OPTIMIZERS, PARAM_ROLES, check_implements
from trainer.sophia import SophiaG, sample_from_softmax


def param_role(model: torch.nn.Module, name: str, p: torch.nn.Parameter) -> str:
    if p is getattr(model, "output_embedding", None):
        return "head"
    if name.startswith("wte."):
        return "embedding"
    return "matrix" if p.dim() >= 2 else "vector"


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per role that has parameters: params, lr_scale, weight_decay, role.

    With independent_wd the configured decay is divided by the group's peak lr, so that the
    decay applied per step is weight_decay * lr_t / lr (it follows the schedule but not the lr's size).
    """
    by_role: dict[str, list] = {role: [] for role in PARAM_ROLES}
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:  # a tied matrix once
            seen.add(id(p))
            by_role[param_role(model, name, p)].append(p)
    groups = []
    for role, params in by_role.items():
        if not params:
            continue
        scale = getattr(cfg, f"{role}_lr_scale")
        wd = cfg.weight_decay if params[0].dim() >= 2 else 0.0
        if cfg.independent_wd:
            wd = wd / (cfg.lr * scale)
        groups.append(
            {"params": params, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": wd, "role": role}
        )
    return groups


@dataclass(frozen=True)
class RunShape:
    """What some optimizers need to know of the run: its optimizer steps (AdEMAMix warms beta3 and
    alpha up over them) and the tokens of one step's global batch (Sophia's Hessian estimate is
    B times the squared gradient of a mean over B tokens)."""

    steps: int | None = None
    batch_tokens: int | None = None

    def need(self, name: str, what: str) -> int:
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"optimizer {name}: needs the run's {what} (build it with a RunShape)")
        return value


def run_shape(cfg) -> RunShape:
    """The RunShape of a RunConfig."""
    return RunShape(cfg.train.steps, cfg.tokens_per_step)


# --- an optimizer of two optimizers (Muon and AdamW) ------------------------------------------


class Composite:
    """Optimizers over disjoint parameters, stepped as one: step, zero_grad, state_dict and
    load_state_dict go to each part in order, and param_groups lists every part's groups (the
    groups themselves: setting a group's lr sets that part's), so the loop, the schedule and
    lr_overflows see one optimizer. method.after_step runs after step(), i.e. after every part."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        parts = state["parts"]
        if len(parts) != len(self.parts):
            raise ValueError(f"{len(parts)} optimizer states for {len(self.parts)} optimizers")
        for part, part_state in zip(self.parts, parts):
            part.load_state_dict(part_state)


# --- hooks: what the training loop asks of an optimizer besides step and zero_grad --------------


class OptimizerHooks:
    """The training loop calls each of these for every optimizer; these defaults do nothing."""

    def evaluation_weights(self, optimizer) -> AbstractContextManager:
        """Around in-training validation and saving final.pt: inside, the model holds the weights
        to evaluate; after, exactly the training weights again."""
        return nullcontext()

    def after_step(self, optimizer, step: int, drawn_backward: Callable) -> None:
        """After step `step` (1-based) is complete: the optimizer's step, zero_grad and the method's
        after_step. drawn_backward(draw) runs forward and backward of the batch-mean cross-entropy
        of this step's inputs against labels draw(logits) drawn from the model's own output
        logits, a slice of positions at a time (gradients into .grad)."""

    def weight_copies(self, optimizer, param: torch.Tensor) -> list[torch.Tensor]:
        """Tensors of the optimizer's state that hold weights of param too: the in-place change a
        method makes to param after each step (mucentering) is made to them as well."""
        return []

    def use_evaluation_weights(self, model, build: Callable, optimizer_state: dict | None) -> None:
        """For evaluating a training checkpoint (not final.pt, which holds them already): put the
        weights to evaluate into model, which holds the checkpoint's training weights.
        build() makes the run's optimizer on model; optimizer_state is the checkpoint's."""


class ScheduleFreeHooks(OptimizerHooks):
    """Schedule-free AdamW trains at y, between its iterate z and their average x; x is what is
    evaluated (optimizer.eval() moves the weights to x, optimizer.train() back to y)."""

    @contextmanager
    def evaluation_weights(self, optimizer) -> Iterator[None]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        training = [p.detach().clone() for p in params]
        optimizer.eval()
        try:
            yield
        finally:
            optimizer.train()  # y again up to rounding: the copies make it exact
            with torch.no_grad():
                for p, saved in zip(params, training):
                    p.copy_(saved)

    def weight_copies(self, optimizer, param):
        """z: x = (y - (1 - beta1) z) / beta1 is linear in y and z, so a linear change made to both
        (centering E's rows) is made to the evaluated x too."""
        z = optimizer.state[param].get("z")
        return [] if z is None else [z]

    def use_evaluation_weights(self, model, build, optimizer_state) -> None:
        if optimizer_state is not None:
            optimizer = build()
            optimizer.load_state_dict(optimizer_state)
            optimizer.eval()


class SophiaHooks(OptimizerHooks):
    """Every hessian_interval steps (after steps k, 2k, ... as the benchmark), a Hessian estimate:
    forward and backward of the cross-entropy against labels sampled from the model's softmax over
    the step's whole batch (micro-batch after micro-batch, so it does not depend on the
    micro-batch size), then SophiaG.update_hessian()."""

    def after_step(self, optimizer, step, drawn_backward) -> None:
        if step % optimizer.hessian_interval == 0:
            drawn_backward(sample_from_softmax)
            optimizer.update_hessian()
            optimizer.zero_grad(set_to_none=True)


# --- builders ----------------------------------------------------------------------------------


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda"
    )


def adamw(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device, shape: RunShape
) -> torch.optim.Optimizer:
    """torch.optim.AdamW, fused on CUDA; every role's group; optim.lr is its lr."""
    return _adamw(param_groups(model, cfg), cfg, device)


def _muon(model, cfg: OptimConfig, device, decoupled: bool) -> Composite:
    """torch.optim.Muon (Nesterov momentum optim.momentum, optim.ns_steps Newton-Schulz steps) on
    the `matrix` role, torch.optim.AdamW on the others, stepped Muon first."""
    groups = param_groups(model, cfg)
    hidden = [g for g in groups if g["role"] == "matrix"]
    if any(p.dim() != 2 for g in hidden for p in g["params"]):
        raise ValueError("muon: the matrix role holds a tensor that is not 2-D")
    if not decoupled:
        for g in hidden:
            g["weight_decay"] = 0.0
    muon = torch.optim.Muon(
        hidden,
        lr=cfg.lr,
        momentum=cfg.param("momentum"),
        nesterov=True,
        ns_steps=cfg.param("ns_steps"),
        adjust_lr_fn="match_rms_adamw" if decoupled else "original",
    )
    return Composite(muon, _adamw([g for g in groups if g["role"] != "matrix"], cfg, device))


def muon(model, cfg, device, shape) -> Composite:
    """Muon (Keller Jordan's): torch.optim.Muon on the hidden 2-D matrices (the `matrix` role: qkv
    whole, see the module doc), without weight decay, lr scaled by sqrt(max(1, rows / cols));
    AdamW (as `adamw`) on the embedding, head and vectors. optim.lr is AdamW's lr; the matrices'
    lr is optim.lr x optim.matrix_lr_scale (Muon's usual 0.02 against AdamW's 1e-3: a scale of 20)."""
    return _muon(model, cfg, device, decoupled=False)


def dmuon(model, cfg, device, shape) -> Composite:
    """D-Muon (Liu et al. 2025, "Muon is scalable"): `muon` with decoupled weight decay
    (p <- p (1 - lr wd), optim.weight_decay) on the matrices and the update scaled to AdamW's RMS
    (torch.optim.Muon adjust_lr_fn="match_rms_adamw": lr x 0.2 sqrt(max(rows, cols))), so that
    optim.lr and optim.weight_decay are AdamW's for every parameter."""
    return _muon(model, cfg, device, decoupled=True)


def lion(model, cfg, device, shape) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023): pytorch_optimizer.Lion on every role's group, betas optim.beta1,
    optim.beta2, decoupled decay. p <- p - lr sign(beta1 m + (1 - beta1) g), then
    m <- beta2 m + (1 - beta2) g. optim.lr is the size of every coordinate's step."""
    from pytorch_optimizer import Lion

    return Lion(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decouple=True)


def signum(model, cfg, device, shape) -> torch.optim.Optimizer:
    """Signum (Bernstein et al. 2018): pytorch_optimizer.SignSGD with momentum optim.momentum on
    every role's group, decoupled decay: p <- p - lr sign(m), m the EMA of the gradients (the
    sign of the benchmark's heavy-ball sum, a positive multiple of it). optim.lr: the step size."""
    from pytorch_optimizer import SignSGD

    return SignSGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.param("momentum"), weight_decouple=True)


def ademamix(model, cfg, device, shape) -> torch.optim.Optimizer:
    """AdEMAMix (Pagliardini et al. 2024): pytorch_optimizer.AdEMAMix on every role's group:
    Adam's update plus alpha x a slow EMA (beta3) of the gradients over Adam's denominator,
    alpha and beta3 warmed up over the whole run (t_alpha_beta3 = train.steps, as the paper),
    decoupled decay as the paper's AdamW form. optim.lr: Adam's lr."""
    from pytorch_optimizer import AdEMAMix

    return AdEMAMix(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2, cfg.param("beta3")),
        alpha=cfg.param("alpha"),
        t_alpha_beta3=shape.need("ademamix", "steps"),
        eps=cfg.eps,
        weight_decouple=True,
    )


def adopt(model, cfg, device, shape) -> torch.optim.Optimizer:
    """ADOPT (Taniguchi et al. 2024): pytorch_optimizer.ADOPT on every role's group: the
    gradient normalised by the second moment of the previous steps (the first step only records
    g^2), clipped at step^0.25, then momentum; decoupled decay (applied from the first step on,
    where the reference skips it: one step of lr_1 x wd). optim.eps bounds sqrt(v) from below
    (the benchmark: 1e-6). optim.lr: the step size."""
    from pytorch_optimizer import ADOPT

    return ADOPT(
        param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decouple=True
    )


def mars(model, cfg, device, shape) -> torch.optim.Optimizer:
    """MARS-AdamW (Yuan et al. 2024, its approximate form): pytorch_optimizer.MARS. Tensors of
    dim >= 2 (embedding, head, matrices) step AdamW on the corrected gradient
    c = g + gamma beta1 / (1 - beta1) (g - g_prev), scaled to norm <= 1; vectors step plain AdamW
    (optimize_1d false, as the benchmark), at the same lr, betas and (zero) decay as their group.
    optim.lr: AdamW's lr for both."""
    from pytorch_optimizer import MARS

    return MARS(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        gamma=cfg.param("gamma"),
        mars_type="adamw",
        optimize_1d=False,
        lr_1d=cfg.lr,  # the vectors' lr is their group's: a factor of exactly 1
        betas_1d=(cfg.beta1, cfg.beta2),
        weight_decay_1d=0.0,  # vectors never decay (module doc)
        eps=cfg.eps,
    )


def soap(model, cfg, device, shape) -> torch.optim.Optimizer:
    """SOAP (Vyas et al. 2024): pytorch_optimizer.SOAP on every role's group: Adam in the
    eigenbasis of Shampoo's two preconditioners (EMA optim.shampoo_beta, default optim.beta2),
    refreshed every optim.precondition_frequency steps; sides longer than 10000 (the vocabulary)
    and vectors stay unrotated. The first step only records the preconditioners. Decoupled decay.
    optim.lr: Adam's lr."""
    from pytorch_optimizer import SOAP

    return SOAP(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        shampoo_beta=cfg.param("shampoo_beta"),  # None: optim.beta2
        precondition_frequency=cfg.param("precondition_frequency"),
        eps=cfg.eps,
    )


def prodigy(model, cfg, device, shape) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko and Defazio 2024): pytorch_optimizer.Prodigy on every role's group:
    AdamW whose step size d is estimated on the fly, growing from d0 = 1e-6 (scaled by
    optim.d_coef); decoupled decay. optim.lr multiplies d (~1). Prodigy has one step size for all
    groups (the first group's lr), so the role lr scales must all be 1."""
    from pytorch_optimizer import Prodigy

    check_one_step_size(cfg)
    return Prodigy(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        d_coef=cfg.param("d_coef"),
        eps=cfg.eps,
        weight_decouple=True,
    )


def sfadamw(model, cfg, device, shape) -> torch.optim.Optimizer:
    """Schedule-free AdamW (Defazio et al. 2024): schedulefree.AdamWScheduleFree on every role's
    group (r 0, weight_lr_power 2, as the benchmark), left in train mode. Its warmup is the
    run's (optim.warmup with optim.schedule constant: the loader refuses another schedule), so
    its own warmup_steps is 0. Training steps at y; validation and final.pt use the average x
    (ScheduleFreeHooks); checkpoints hold y and the optimizer's z. optim.lr: its lr."""
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(
        param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, warmup_steps=0
    )
    optimizer.train()
    return optimizer


def sophia(model, cfg, device, shape) -> torch.optim.Optimizer:
    """Sophia-G: trainer.sophia.SophiaG (written here: see its doc) on every role's group, betas
    optim.beta1, optim.beta2, clipping scale optim.rho, decoupled decay, a Hessian estimate
    every optim.hessian_interval steps (SophiaHooks). optim.lr: the largest step of a coordinate."""
    return SophiaG(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        rho=cfg.param("rho"),
        batch_tokens=shape.need("sophia", "batch_tokens"),
        hessian_interval=cfg.param("hessian_interval"),
    )


BUILDERS: dict[str, Callable] = {
    "adamw": adamw,
    "muon": muon,
    "dmuon": dmuon,
    "lion": lion,
    "signum": signum,
    "ademamix": ademamix,
    "adopt": adopt,
    "mars": mars,
    "soap": soap,
    "prodigy": prodigy,
    "sfadamw": sfadamw,
    "sophia": sophia,
}
check_implements("optimizers", BUILDERS, OPTIMIZERS)
# fp32 values of optimizer state per parameter, at least (for the memory estimate of train.py):
# Muon keeps one for its matrices and two for the AdamW part, SOAP adds its preconditioners
# (two m x m and two n x n per matrix) to two moments. tests/test_optimizers.py measures them.
STATE_FLOATS: dict[str, int] = {
    "adamw": 2, "muon": 1, "dmuon": 1, "lion": 1, "signum": 1, "ademamix": 3, "adopt": 2,
    "mars": 3, "soap": 2, "prodigy": 4, "sfadamw": 2, "sophia": 2,
}  # fmt: skip
check_implements("optimizer state sizes", STATE_FLOATS, OPTIMIZERS)


def bytes_per_parameter(name: str) -> int:
    """fp32 weights and gradients, and the optimizer's state: 16 for AdamW."""
    return 8 + 4 * STATE_FLOATS[name]


NO_HOOKS = OptimizerHooks()
HOOKS: dict[str, OptimizerHooks] = {"sfadamw": ScheduleFreeHooks(), "sophia": SophiaHooks()}
assert set(HOOKS) <= set(OPTIMIZERS), sorted(set(HOOKS) - set(OPTIMIZERS))


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device, shape: RunShape = RunShape()
) -> torch.optim.Optimizer:
    return BUILDERS[cfg.name](model, cfg, device, shape)


def optimizer_hooks(cfg: OptimConfig) -> OptimizerHooks:
    return HOOKS.get(cfg.name, NO_HOOKS)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """lr is the schedule's lr of optim.lr; each group gets its share (a scale of 1.0 gives lr
    itself, bit for bit)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
