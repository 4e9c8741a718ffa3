"""Typed run config: one YAML file per run, every key checked on load.

Every key, its default and its range is documented in config/README.md. Loading rejects
unknown keys, wrong types and out-of-range values with an error that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.methods import METHODS

SCHEDULES = ("cosine", "constant", "wsd")
DTYPES = ("bfloat16", "float32")
MLPS = ("swiglu", "gelu")
INITS = ("paper", "normal")


class ConfigError(ValueError):
    """A run config that cannot be trained: the message names the offending key."""


def _key(default=dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, choices=None):
    """A dataclass field with its validation rules attached as metadata."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    n_layer: int = _key(6, lo=1)
    n_head: int = _key(4, lo=1)
    n_embd: int = _key(224, lo=1)
    vocab_size: int = _key(50304, lo=2)  # padded vocabulary: rows of E
    seq_len: int = _key(2048, lo=1)
    tied: bool = _key(False)
    qk_norm: bool = _key(True)
    rope_fraction: float = _key(0.5, lo=0.0, hi=1.0)
    mlp: str = _key("swiglu", choices=MLPS)
    init: str = _key("paper", choices=INITS)


@dataclass
class MethodConfig:
    name: str = _key("baseline", choices=tuple(METHODS))
    # `lambda` is a Python keyword: the YAML key `lambda` maps to this field.
    lambda_: float | None = _key(None, lo=0.0, lo_open=True)
    cap: float | None = _key(None, lo=0.0, lo_open=True)


@dataclass
class OptimConfig:
    lr: float = _key(1e-3, lo=0.0, lo_open=True)
    min_lr: float = _key(1e-5, lo=0.0)
    beta1: float = _key(0.9, lo=0.0, hi=1.0)
    beta2: float = _key(0.95, lo=0.0, hi=1.0)
    eps: float = _key(1e-8, lo=0.0, lo_open=True)
    weight_decay: float = _key(0.0, lo=0.0)
    independent_wd: bool = _key(False)
    grad_clip: float = _key(1.0, lo=0.0)  # 0 disables clipping
    warmup: int = _key(5000, lo=0)
    schedule: str = _key("cosine", choices=SCHEDULES)


@dataclass
class TrainConfig:
    steps: int = _key(100_000, lo=1)
    batch_size: int = _key(64, lo=1)  # global, in sequences
    micro_batch: int | str = _key("auto")  # sequences per forward pass and rank, or "auto"
    dtype: str = _key("bfloat16", choices=DTYPES)
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
    micro_batch: int = _key(16, lo=1)
    logit_batches: int = _key(4, lo=1)  # micro-batches for the logit statistics


@dataclass
class DataConfig:
    dir: str = _key()
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
    seed: int = _key(1, lo=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def resume_hash(self) -> str:
        """Hash of every value that changes the math; a checkpoint is only resumed under the same hash."""
        plain = self.to_dict()
        for dotted in RESUME_NEUTRAL_KEYS:
            section, _, key = dotted.partition(".")
            if key:
                plain[section].pop(key, None)
            else:
                plain.pop(section, None)
        text = json.dumps(plain, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def _yaml_name(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


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
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {value!r} is out of range (must be <= {hi})")
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
    needs = METHODS[method.name].param
    for key, value in (("lambda", method.lambda_), ("cap", method.cap)):
        if key == needs and value is None:
            raise ConfigError(f"method.{key}: required for method {method.name}")
        if key != needs and value is not None:
            raise ConfigError(f"method.{key}: not a parameter of method {method.name}")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr: {cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}")
    t = cfg.train
    if t.micro_batch != "auto" and t.batch_size % t.micro_batch:
        raise ConfigError(
            f"train.micro_batch: {t.micro_batch} does not divide train.batch_size={t.batch_size}"
        )


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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


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
