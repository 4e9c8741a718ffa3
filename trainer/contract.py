"""What the trainer and the workflow agree on, in one module that imports no torch.

- Option sets (methods, optimizers, schedules, model parts): each a registry of `Option`s, with
  the option's hyper-parameters (`Param`: run-config key, range, run-id code). The run-config
  loader, the run-id codec, the grid, bench, the published import and the docs read them here;
  the code of each option lives in its family's module (trainer/methods.py, trainer/optim.py,
  trainer/model.py), which checks on import that it implements exactly the registry's names.
- Metric names of eval.json and train.json, and run statuses.
- The layout of a run directory and of an experiment's results, and how to read a run's state.

The workflow imports this (through trainer.config) for every dry run: keep it free of torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Param:
    """A hyper-parameter of an option: the run-config key `<section>.<key>` (method.lambda,
    optim.rho), its type and range (checked by the loader), the default the option uses when the
    key is unset, and its run-id code. Set for an option that lacks it, it is refused by name."""

    key: str
    code: str
    example: float  # a typical value: bench and the tests use it
    doc: str = ""
    kind: str = "float"  # float or int
    default: float | None = None  # what the option uses when the key is unset (None: required)
    lo: float = 0.0
    lo_open: bool = True
    hi: float | None = None
    hi_open: bool = False


@dataclass(frozen=True)
class Option:
    name: str
    doc: str
    params: tuple[Param, ...] = ()


def registry(*options: Option) -> dict[str, Option]:
    return {o.name: o for o in options}


def check_implements(family: str, names, options: dict[str, Option]) -> None:
    """Called by each family's module on import: a registry entry without code (or code without an
    entry) fails every run and test at once, naming it."""
    if set(names) != set(options):
        missing, extra = sorted(set(options) - set(names)), sorted(set(names) - set(options))
        raise ImportError(f"{family}: registry and code differ (no code: {missing}; not registered: {extra})")


# --- option sets ---------------------------------------------------------------------------

METHODS = registry(
    Option("baseline", "no mitigation"),
    Option(
        "zloss",
        "adds lambda * mean over positions of logsumexp(logits)^2 to the loss",
        (Param("lambda", "g", 1e-4, "z-loss weight"),),
    ),
    Option(
        "muloss",
        "adds lambda * ||mu||^2 to the loss, mu the mean row of the output embedding",
        (Param("lambda", "g", 1e-4, "mu-loss weight"),),
    ),
    Option("mucentering", "subtracts mu from every row of the output embedding after each step"),
    Option("softcap", "logits <- cap * tanh(logits / cap)", (Param("cap", "c", 30.0, "logit cap"),)),
)


def example_params(method: str) -> dict[str, float]:
    """The method's hyper-parameters at their typical values (bench, parity, tests)."""
    return {p.key: p.example for p in METHODS[method].params}


def params_of(options: dict[str, Option]) -> dict[str, Param]:
    """Every hyper-parameter of a family, by key (a key shared by options is one parameter)."""
    found: dict[str, Param] = {}
    for option in options.values():
        for p in option.params:
            if found.setdefault(p.key, p) != p:
                raise ValueError(f"{p.key}: two different parameters of one name")
    return found


# Optimizer hyper-parameters beyond the shared optim.lr, beta1, beta2, eps, weight_decay. A key
# shared by several optimizers means the same thing in each.
MOMENTUM = Param("momentum", "mom", 0.95, "momentum of the matrix (Muon) or sign (Signum) update", default=0.95, hi=1.0, hi_open=True)  # fmt: skip
NS_STEPS = Param("ns_steps", "ns", 5, "Newton-Schulz iterations of the orthogonalisation", kind="int", default=5, lo=1, lo_open=False)  # fmt: skip
OPTIMIZERS = registry(
    Option("adamw", "torch.optim.AdamW; weight decay on matrices (dim >= 2) only"),
    Option(
        "muon",
        "Muon on the hidden matrices (no weight decay, lr x sqrt(max(1, rows/cols)), qkv whole), AdamW on embedding, head and vectors",
        (MOMENTUM, NS_STEPS),
    ),
    Option(
        "dmuon",
        "Muon with decoupled weight decay and AdamW-matched update RMS (D-Muon)",
        (MOMENTUM, NS_STEPS),
    ),
    Option("lion", "Lion: sign of the interpolated momentum (betas: optim.beta1, optim.beta2)"),
    Option("signum", "sign of the momentum (optim.momentum)", (MOMENTUM,)),
    Option(
        "ademamix",
        "AdEMAMix: Adam plus a slow EMA of gradients (beta3, weight alpha; both warmed up over the run)",
        (
            Param("beta3", "b3", 0.9999, "slow EMA's beta", default=0.9999, hi=1.0, hi_open=True),
            Param("alpha", "alpha", 8.0, "weight of the slow EMA", default=8.0),
        ),
    ),
    Option(
        "adopt",
        "ADOPT: the second moment of the previous step normalises the gradient (optim.eps bounds its root; the benchmark uses 1e-6)",
    ),
    Option(
        "mars",
        "MARS-AdamW (approximate): variance-reduced gradient on tensors of dim >= 2; vectors plain AdamW",
        (Param("gamma", "gam", 0.025, "variance-reduction weight", default=0.025),),
    ),
    Option(
        "soap",
        "SOAP: Adam in the eigenbasis of Shampoo's preconditioner",
        (
            Param(
                "precondition_frequency",
                "pf",
                10,
                "steps between eigenbasis updates",
                kind="int",
                default=10,
                lo=1,
                lo_open=False,
            ),
            Param(
                "shampoo_beta",
                "sb",
                0.95,
                "EMA of the preconditioner (default: optim.beta2)",
                hi=1.0,
                hi_open=True,
            ),
        ),
    ),
    Option(
        "prodigy",
        "Prodigy: AdamW with the step size estimated on the fly (optim.lr is a multiplier, ~1); every optim.<role>_lr_scale must be 1",
        (Param("d_coef", "dc", 1.0, "scale of the estimated step size", default=1.0),),
    ),
    Option("sfadamw", "schedule-free AdamW: evaluation uses the averaged weights (optim.schedule: constant)"),
    Option(
        "sophia",
        "Sophia: clipped update preconditioned by a Gauss-Newton-Bartlett Hessian estimate",
        (
            Param("rho", "rho", 0.04, "clipping scale of the preconditioned update", default=0.04),
            Param(
                "hessian_interval",
                "hi",
                10,
                "steps between Hessian estimates",
                kind="int",
                default=10,
                lo=1,
                lo_open=False,
            ),
        ),
    ),
)
SCHEDULES = registry(
    Option("cosine", "warmup, then cosine from optim.lr to the final lr"),
    Option("linear", "warmup, then linear from optim.lr to the final lr"),
    Option("constant", "warmup, then optim.lr"),
    Option(
        "wsd",
        "warmup, then optim.lr, then a decay (optim.decay_shape) to the final lr over the last optim.decay_fraction of the steps",
    ),
)
DECAY_SHAPES = registry(  # of wsd's decay, p the progress through it from 0 to 1
    Option("linear", "1 - p"),
    Option("cosine", "(1 + cos(pi p)) / 2"),
    Option("1-sqrt", "1 - sqrt(p)"),
    Option("square", "1 - p^2"),
    Option("exp", "geometric: lr (final/lr)^p, the final lr floored at 1e-4 x optim.lr"),
    Option(
        "mirrored-cosine",
        "2 (1 - p) - (1 + cos(pi p)) / 2: the cosine reflected about the linear (fast, slow, fast)",
    ),
)
NORMS = registry(
    Option("layernorm", "LayerNorm without bias (the paper's)"),
    Option("rmsnorm", "RMSNorm (Llama's)"),
)
MLPS = registry(
    Option("swiglu", "W2(silu(W x) * V x), hidden m * ceil(int(8H/3) / m), m = model.mlp_multiple"),
    Option("gelu", "W2(gelu(W x)), hidden 4H"),
)
INITS = registry(
    Option("paper", "the paper's initialisation (docs/protocol.md)"),
    Option("normal", "N(0, 0.02) everywhere"),
)
DTYPES = ("bfloat16", "float32")
# Parameter roles: each gets its own peak lr (optim.<role>_lr_scale x optim.lr).
PARAM_ROLES = ("embedding", "head", "matrix", "vector")

# --- metrics and statuses ------------------------------------------------------------------

GEOMETRY = ("mu_norm", "emb_norm_max", "emb_norm_mean", "emb_norm_min", "smin", "smax", "b_ratio")
LOGIT_STATS = (
    "logit_mean",  # mean_t mean_j l
    "logit_std",  # mean_t std_j l
    "logit_mean_std",  # std_t mean_j l
    "logit_std_std",  # std_t std_j l
    "logit_absmean",  # mean_t mean_j |l|
    "logit_absmax",  # mean_t max_j |l|
    "lse2",  # mean_t (logsumexp_j l)^2
)
HIDDEN = ("mu_h_dot", "mu_h_cos")  # mu against the mean final hidden state
EVAL_METRICS = ("test_loss", *GEOMETRY, *LOGIT_STATS, *HIDDEN)  # eval.json
TRAIN_METRICS = ("train_time_s", "tokens_per_s")  # train.json
# Figures drawn from each member's run directory (its logs and config) rather than runs.csv: an
# experiment without run directories (published) cannot draw them.
RUN_FIGURES = ("train_loss", "val_curves", "schedules")
# The metric columns of runs.csv (docs/design.md "Metric names"); a completed run without one of
# them is an error naming the run and the metric (aggregate).
RUNS_EVAL_METRICS = ("test_loss", *GEOMETRY, *LOGIT_STATS)

COMPLETED = "completed"
FINISHED = (COMPLETED, "diverged")  # train.json statuses of a run that is done training
MISSING = "missing"  # runs.csv: asked for, never evaluated
PUBLISHED = "published"  # runs.csv: imported from the paper's CSVs
STATUSES = (*FINISHED, MISSING, PUBLISHED)

# --- layout --------------------------------------------------------------------------------

RESULTS = "results"


class RunDir:
    """The files of one run directory (RUN below), written by the trainer and read by everyone."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    config = property(lambda self: self._file("config.yaml"))  # the resolved run config
    final = property(lambda self: self._file("final.pt"))  # final weights (a diverged run: none)
    train_info = property(lambda self: self._file("train.json"))  # status, times, provenance
    evaluation = property(lambda self: self._file("eval.json"))  # the metrics
    train_log = property(lambda self: self._file("train.jsonl"))  # a row per log_every steps
    val_log = property(lambda self: self._file("val.jsonl"))  # a row per eval_every steps
    attempts = property(lambda self: self._file("attempts.json"))  # seconds of earlier attempts
    checkpoints = property(lambda self: self._file("checkpoints"))
    logs = property(lambda self: self._file("logs"))  # train.attempt<N>.log, evaluate.log

    def status(self) -> str | None:
        """train.json's status, or None before training ends."""
        try:
            return json.loads(Path(self.train_info).read_text()).get("status")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def state(self) -> str:
        """finished (evaluated) | trained | started (has a checkpoint) | configured | new."""
        if Path(self.evaluation).exists():
            return "finished"
        if self.status() in FINISHED:
            return "trained"
        if any(Path(self.checkpoints).glob("step_*.pt")):
            return "started"
        return "configured" if Path(self.config).exists() else "new"


class ExperimentDir:
    """results/<experiment>/: runs, runs.csv, tables, figures, logs. Arguments may be wildcard
    patterns (`{run}`): the rules use these paths as they are."""

    def __init__(self, experiment: str, root: str = RESULTS):
        self.path = f"{root}/{experiment}"

    runs_dir = property(lambda self: f"{self.path}/runs")
    runs_csv = property(lambda self: f"{self.path}/runs.csv")
    experiment_file = property(lambda self: f"{self.path}/experiment.yaml")
    plan_log = property(lambda self: f"{self.path}/logs/plan.txt")

    def run(self, run_id: str) -> RunDir:
        return RunDir(f"{self.runs_dir}/{run_id}")

    def log(self, rule: str, name: str | None = None) -> str:
        """logs/<rule>.log, or logs/<rule>/<name>.log for a rule with a job per run or comparison."""
        return f"{self.path}/logs/{rule}.log" if name is None else f"{self.path}/logs/{rule}/{name}.log"

    def comparison_csv(self, comparison: str) -> str:
        return f"{self.path}/comparisons/{comparison}.csv"

    def tables_dir(self, comparison: str) -> str:
        return f"{self.path}/tables/{comparison}"

    def figures_dir(self, comparison: str) -> str:
        return f"{self.path}/figures/{comparison}"

    def table(self, comparison: str, table: str, ext: str) -> str:
        return f"{self.tables_dir(comparison)}/{table}.{ext}"

    def figure(self, comparison: str, figure: str, ext: str) -> str:
        return f"{self.figures_dir(comparison)}/{figure}.{ext}"
