"""Typed run config: one YAML file per run, every key checked on load.

Every key, its default and its range is documented in config/README.md. Loading rejects
unknown keys, wrong types and out-of-range values with an error that names the key.
A key with a `code` may be a grid axis; the code spells its value in run ids (workflow/scripts/runids.py).
Imports no torch: the workflow loads every run config of a dry run through here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import keyword
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.contract import (
    DECAY_SHAPES,
    DTYPES,
    INITS,
    METHODS,
    MLPS,
    NORMS,
    OPTIMIZERS,
    PARAM_ROLES,
    SCHEDULES,
    Param,
    params_of,
)
from trainer.files import write_atomic


class ConfigError(ValueError):
    """A run config that cannot be trained: the message names the offending key."""


# Upper bounds: far above any model of the paper, low enough that a typo (n_layer: 1000000) is
# refused by the loader instead of allocating until the machine gives up.
MAX_VOCAB = 2**16  # shards hold uint16 token ids: a larger vocabulary has rows no token uses
MAX_STEPS = 10**8 - 1  # checkpoint file names have 8 digits


def _key(
    default=dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, code=None
):
    """A dataclass field with its validation rules (and its run-id code) attached as metadata."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "code": code}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _param(p: Param):
    """An optional run-config key for an option's hyper-parameter: its range and code from the
    registry; unset (None), the option uses the registry's default."""
    return _key(None, lo=p.lo, hi=p.hi, lo_open=p.lo_open, hi_open=p.hi_open, code=p.code)


OPTIM_PARAMS = params_of(OPTIMIZERS)


@dataclass
class ModelConfig:
    n_layer: int = _key(6, lo=1, hi=1024, code="L")
    n_head: int = _key(4, lo=1, hi=1024, code="nh")
    n_embd: int = _key(224, lo=1, hi=65536, code="d")
    vocab_size: int = _key(50304, lo=2, hi=MAX_VOCAB, code="V")  # padded vocabulary: rows of E
    seq_len: int = _key(2048, lo=1, hi=2**20, code="ctx")
    tied: bool = _key(False)
    qk_norm: bool = _key(True, code="qkn")
    qk_norm_kind: str = _key("layernorm", choices=tuple(NORMS), code="qknk")  # with qk_norm: true
    norm: str = _key("layernorm", choices=tuple(NORMS), code="norm")  # the blocks' and the final norm
    rope_fraction: float = _key(0.5, lo=0.0, hi=1.0, code="rope")
    rope_base: float = _key(10000.0, lo=1.0, lo_open=True, code="rb")
    mlp: str = _key("swiglu", choices=tuple(MLPS), code="mlp")
    mlp_multiple: int = _key(256, lo=1, hi=65536, code="mm")  # SwiGLU hidden: a multiple of this
    init: str = _key("paper", choices=tuple(INITS), code="init")


@dataclass
class MethodConfig:
    """The method and its hyper-parameters: one optional key per parameter of the registry
    (trainer/contract.py METHODS), set exactly for the methods that have it."""

    name: str = _key("baseline", choices=tuple(METHODS))
    # `lambda` is a Python keyword: the YAML key `lambda` maps to this field.
    lambda_: float | None = _key(None, lo=0.0, lo_open=True)
    cap: float | None = _key(None, lo=0.0, lo_open=True)


METHOD_PARAMS = tuple(dict.fromkeys(p.key for o in METHODS.values() for p in o.params))


@dataclass
class OptimConfig:
    name: str = _key("adamw", choices=tuple(OPTIMIZERS), code="opt")
    lr: float = _key(1e-3, lo=0.0, lo_open=True)
    min_lr: float = _key(1e-5, lo=0.0, code="minlr")
    beta1: float = _key(0.9, lo=0.0, hi=1.0, hi_open=True, code="b1")  # AdamW refuses 1
    beta2: float = _key(0.95, lo=0.0, hi=1.0, hi_open=True, code="b2")
    eps: float = _key(1e-8, lo=0.0, lo_open=True, code="eps")
    weight_decay: float = _key(0.0, lo=0.0, code="wd")
    independent_wd: bool = _key(False, code="iwd")
    grad_clip: float = _key(1.0, lo=0.0, code="clip")  # 0 disables clipping
    warmup: int = _key(5000, lo=0, code="wu")
    schedule: str = _key("cosine", choices=tuple(SCHEDULES), code="sched")
    # The final lr of cosine, linear and wsd: optim.min_lr, or final_lr_factor x optim.lr if set.
    final_lr_factor: float | None = _key(None, lo=0.0, hi=1.0, code="flr")
    decay_fraction: float = _key(0.2, lo=0.0, hi=1.0, lo_open=True, code="dfr")  # wsd
    decay_shape: str = _key("linear", choices=tuple(DECAY_SHAPES), code="dsh")  # wsd
    # Peak lr of each parameter role (contract.PARAM_ROLES) = optim.lr x its scale; the schedule
    # multiplies them all alike. 1.0 everywhere is the paper's single lr.
    embedding_lr_scale: float = _key(1.0, lo=0.0, lo_open=True, code="lre")
    head_lr_scale: float = _key(1.0, lo=0.0, lo_open=True, code="lrh")
    matrix_lr_scale: float = _key(1.0, lo=0.0, lo_open=True, code="lrm")
    vector_lr_scale: float = _key(1.0, lo=0.0, lo_open=True, code="lrv")
    # Hyper-parameters of some optimizers (trainer/contract.py OPTIMIZERS): set only for those.
    momentum: float | None = _param(OPTIM_PARAMS["momentum"])
    ns_steps: int | None = _param(OPTIM_PARAMS["ns_steps"])
    beta3: float | None = _param(OPTIM_PARAMS["beta3"])
    alpha: float | None = _param(OPTIM_PARAMS["alpha"])
    gamma: float | None = _param(OPTIM_PARAMS["gamma"])
    precondition_frequency: int | None = _param(OPTIM_PARAMS["precondition_frequency"])
    shampoo_beta: float | None = _param(OPTIM_PARAMS["shampoo_beta"])
    d_coef: float | None = _param(OPTIM_PARAMS["d_coef"])
    rho: float | None = _param(OPTIM_PARAMS["rho"])
    hessian_interval: int | None = _param(OPTIM_PARAMS["hessian_interval"])

    def param(self, key: str):
        """An optimizer hyper-parameter as the optimizer uses it: set, or the registry's default."""
        value = getattr(self, key)
        return OPTIM_PARAMS[key].default if value is None else value


@dataclass
class TrainConfig:
    steps: int = _key(100_000, lo=1, hi=MAX_STEPS, code="T")
    batch_size: int = _key(64, lo=1, hi=2**20, code="B")  # global, in sequences
    micro_batch: int | str = _key("auto")  # sequences per forward pass and rank, or "auto"
    dtype: str = _key("bfloat16", choices=DTYPES, code="dt")
    compile: bool = _key(False)
    checkpoint_every: int = _key(1000, lo=0)  # steps; 0 = only on signals and by time
    checkpoint_minutes: float = _key(30.0, lo=0.0)  # 0 = off
    keep_checkpoints: int = _key(2, lo=1)
    log_every: int = _key(100, lo=1)
    eval_every: int = _key(0, lo=0)  # steps; 0 = no in-training validation
    eval_batches: int = _key(20, lo=1)


@dataclass
class EvalConfig:
    batches: int = _key(2000, lo=1)  # validation micro-batches for test_loss
    micro_batch: int = _key(16, lo=1, hi=2**16)
    logit_batches: int = _key(4, lo=1)  # micro-batches for the logit statistics


@dataclass
class DataConfig:
    dir: str = _key()
    seed: int | None = _key(None, lo=0, hi=2**63 - 1, code="dseed")  # the data order's; default: seed
    train_pattern: str = _key("*_train_*.bin")
    val_pattern: str = _key("*_val_*.bin")


@dataclass
class WandbConfig:
    enabled: bool = _key(False)
    project: str = _key("output-embedding-centering")


@dataclass
class RunConfig:
    run: str = _key()
    data: DataConfig = _key()
    seed: int = _key(1, lo=0, hi=2**63 - 1)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step: the global batch of sequences times their length."""
        return self.train.batch_size * self.model.seq_len

    def resume_hash(self) -> str:
        """Hash of the values that change the math and differ from their defaults; a checkpoint
        is only resumed under one of resume_hashes().

        A key added with a default leaves every existing hash unchanged, so runs in progress stay
        resumable. The flip side: never change the default of a math key (runs relying on it
        would resume under other math with the same hash); add a key instead.
        """
        return _digest({key: value for key, value, default in _math_values(self) if value != default})

    def legacy_resume_hash(self) -> str:
        """The hash checkpoints recorded before resume_hash() left defaults out: every math key of
        that time (LEGACY_HASH_KEYS) in nested sections, and any later key only where it differs
        from its default, so that a later key set away from its default still changes it."""
        nested: dict[str, Any] = {}
        for key, value, default in _math_values(self):
            if key in LEGACY_HASH_KEYS or value != default:
                section, _, name = key.rpartition(".")
                (nested.setdefault(section, {}) if section else nested)[name] = value
        return _digest(nested)

    def resume_hashes(self) -> tuple[str, str]:
        """The hashes a checkpoint of this run may carry: today's, and the legacy one."""
        return self.resume_hash(), self.legacy_resume_hash()


# Keys that may change between attempts of one run without changing what it computes.
RESUME_NEUTRAL_KEYS = (
    "run",
    "data.dir",
    "train.micro_batch",
    "train.compile",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.keep_checkpoints",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "eval",
    "wandb",
)

# The math keys when the resume hash covered every key, defaults included (legacy_resume_hash).
# Frozen: a key added since is not listed here.
LEGACY_HASH_KEYS = frozenset(
    """
    seed data.train_pattern data.val_pattern
    model.n_layer model.n_head model.n_embd model.vocab_size model.seq_len model.tied model.qk_norm
    model.rope_fraction model.mlp model.init method.name method.lambda method.cap
    optim.lr optim.min_lr optim.beta1 optim.beta2 optim.eps optim.weight_decay optim.independent_wd
    optim.grad_clip optim.warmup optim.schedule train.steps train.batch_size train.dtype
    """.split()
)


def _math_values(cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, value, default) of every key not in RESUME_NEUTRAL_KEYS; a required key's
    default is MISSING, so it always counts as set."""
    found = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            keys = [
                (f"{section.name}.{_yaml_name(f)}", getattr(value, f.name), f)
                for f in dataclasses.fields(value)
            ]
        else:
            keys = [(_yaml_name(section), value, section)]
        for key, v, f in keys:
            if key not in RESUME_NEUTRAL_KEYS and key.partition(".")[0] not in RESUME_NEUTRAL_KEYS:
                found.append((key, _to_plain(v), _default(f)))
    return found


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return _to_plain(f.default_factory())
    return f.default


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _yaml_name(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


def field_name(yaml_name: str) -> str:
    """The dataclass field of a YAML key (`lambda` -> `lambda_`)."""
    return yaml_name + "_" if keyword.iskeyword(yaml_name) else yaml_name


def _to_plain(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_yaml_name(f): _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj


def _check_value(where: str, value: Any, f: dataclasses.Field) -> Any:
    """Coerce and range-check one scalar; raise ConfigError naming `where`."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if kind.startswith("int | str"):  # micro_batch: a positive int or "auto"
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: expected a positive integer or 'auto', got {value!r}")
        return value
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif kind.startswith("float"):
        value = _as_float(where, value)
    elif kind.startswith("str"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        raise ConfigError(f"{where}: {value!r} is out of range (must be {bound})")
    if hi is not None and (value > hi or (meta.get("hi_open") and value == hi)):
        bound = f"< {hi}" if meta.get("hi_open") else f"<= {hi}"
        raise ConfigError(f"{where}: {value!r} is out of range (must be {bound})")
    return value


def _as_float(where: str, value: Any) -> float:
    # YAML 1.1 reads `1e-3` (no dot) as a string; accept it, but nothing non-numeric.
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {_yaml_name(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{name}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        sub = _dataclass_type(f)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: missing required key")
            continue
        if sub is not None:
            values[f.name] = _build(sub, raw[name], path)
        else:
            values[f.name] = _check_value(path, raw[name], f)
    return cls(**values)


def _dataclass_type(f: dataclasses.Field):
    return _SECTIONS.get(f.type if isinstance(f.type, str) else f.type.__name__)


_SECTIONS = {
    c.__name__: c
    for c in (
        ModelConfig,
        MethodConfig,
        OptimConfig,
        TrainConfig,
        EvalConfig,
        DataConfig,
        WandbConfig,
    )
}


def check_one_step_size(optim: OptimConfig) -> None:
    """Prodigy has one step size for every parameter (its first group's), so every role's lr
    scale must be 1: checked when a run config loads and when the optimizer is built."""
    scaled = [r for r in PARAM_ROLES if getattr(optim, f"{r}_lr_scale") != 1.0]
    if optim.name == "prodigy" and scaled:
        raise ConfigError(
            f"optim.{scaled[0]}_lr_scale: prodigy has one step size for every parameter (every scale must be 1)"
        )


def _check_consistency(cfg: RunConfig) -> None:
    m = cfg.model
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd: {m.n_embd} is not divisible by model.n_head={m.n_head}")
    head_dim = m.n_embd // m.n_head
    if int(head_dim * m.rope_fraction) % 2:
        raise ConfigError(
            f"model.rope_fraction: rotating {head_dim}*{m.rope_fraction} dims needs an even count"
        )
    method = cfg.method
    needs = {p.key for p in METHODS[method.name].params}
    for key in METHOD_PARAMS:
        value = getattr(method, field_name(key))
        if key in needs and value is None:
            raise ConfigError(f"method.{key}: required for method {method.name}")
        if key not in needs and value is not None:
            raise ConfigError(f"method.{key}: not a parameter of method {method.name}")
    optim = cfg.optim
    allowed = {p.key for p in OPTIMIZERS[optim.name].params}
    for key in OPTIM_PARAMS:
        if key not in allowed and getattr(optim, key) is not None:
            raise ConfigError(f"optim.{key}: not a hyper-parameter of optimizer {optim.name}")
    check_one_step_size(optim)
    if optim.name == "sfadamw" and optim.schedule != "constant":
        raise ConfigError(
            "optim.schedule: schedule-free AdamW (sfadamw) needs `constant` (it is its own schedule)"
        )
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr: {cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}")
    t = cfg.train
    if t.micro_batch != "auto" and t.batch_size % t.micro_batch:
        raise ConfigError(
            f"train.micro_batch: {t.micro_batch} does not divide train.batch_size={t.batch_size}"
        )


def _axis_fields() -> dict[str, dataclasses.Field]:
    found = {}
    for section in dataclasses.fields(RunConfig):
        cls = _dataclass_type(section)
        for f in dataclasses.fields(cls) if cls else []:
            if f.metadata.get("code"):
                found[f"{section.name}.{_yaml_name(f)}"] = f
    return found


# Run-config keys a grid may sweep (`axes`), by dotted key: those with a run-id code.
AXES: dict[str, dataclasses.Field] = _axis_fields()


def axis_code(key: str) -> str:
    return AXES[key].metadata["code"]


def axis_default(key: str) -> Any:
    return _default(AXES[key])


def axis_type(key: str) -> str:
    """bool, int, float or str."""
    kind = AXES[key].type if isinstance(AXES[key].type, str) else AXES[key].type.__name__
    return kind.split(" ")[0]


def check_axis_value(key: str, value: Any) -> Any:
    """An axis value as the loader would take it (1e-3 as text -> 0.001, 0 -> 0.0 for a float)."""
    return _check_value(key, value, AXES[key])


def config_from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    _check_consistency(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: run config not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write atomically, so a half-written config is never read."""
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def micro_batch_size(cfg: RunConfig, world_size: int, token_cap: int) -> int:
    """Sequences per forward pass on one rank.

    "auto" picks the largest divisor of the per-rank batch whose tokens fit in `token_cap`.
    """
    per_rank, rest = divmod(cfg.train.batch_size, world_size)
    if rest:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by the world size {world_size}"
        )
    if cfg.train.micro_batch != "auto":
        if per_rank % cfg.train.micro_batch:
            raise ConfigError(
                f"train.micro_batch: {cfg.train.micro_batch} does not divide the per-rank batch {per_rank}"
            )
        return cfg.train.micro_batch
    cap = max(1, token_cap // cfg.model.seq_len)
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= cap)
