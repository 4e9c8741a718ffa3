import dataclasses

import pytest
import yaml

from trainer.config import (
    ConfigError,
    OptimConfig,
    _key,
    config_from_dict,
    load_config,
    micro_batch_size,
    save_config,
)

BASE = {"run": "r", "data": {"dir": "data/x"}}


def make(**sections):
    raw = {**BASE, **{k: v for k, v in sections.items()}}
    return config_from_dict(raw)


def test_defaults_are_the_paper_protocol():
    cfg = make()
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.95, 1e-8)
    assert (cfg.optim.warmup, cfg.train.steps, cfg.train.batch_size) == (5000, 100_000, 64)
    assert (cfg.model.vocab_size, cfg.model.seq_len, cfg.model.rope_fraction) == (50304, 2048, 0.5)
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.weight_decay == 0.0
    assert cfg.train.micro_batch == "auto" and cfg.method.name == "baseline"


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": {"n_layers": 3}}, "model.n_layers"),
        ({"bogus": 1}, "bogus"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"optim": {"lr": -1e-3}}, "optim.lr"),
        ({"optim": {"lr": 0}}, "optim.lr"),
        ({"model": {"n_layer": 2.5}}, "model.n_layer"),
        ({"model": {"tied": "yes"}}, "model.tied"),
        ({"train": {"micro_batch": 0}}, "train.micro_batch"),
        ({"train": {"micro_batch": "big"}}, "train.micro_batch"),
        ({"train": {"micro_batch": 5}}, "train.micro_batch"),  # does not divide 64
        ({"optim": {"schedule": "cubic"}}, "optim.schedule"),
        ({"optim": {"beta2": 1.5}}, "optim.beta2"),
        ({"method": {"name": "zloss"}}, "method.lambda"),
        ({"method": {"name": "softcap"}}, "method.cap"),
        ({"method": {"name": "baseline", "lambda": 1e-4}}, "method.lambda"),
        ({"method": {"name": "muloss", "lambda": 1e-4, "cap": 30}}, "method.cap"),
        ({"method": {"name": "nope"}}, "method.name"),
        ({"model": {"n_embd": 30, "n_head": 4}}, "model.n_embd"),
        ({"data": {}}, "data.dir"),
        ({"optim": {"lr": 1e-3, "min_lr": 1e-2}}, "optim.min_lr"),
        ({"optim": {"lr": float("nan")}}, "optim.lr"),
        # upper bounds: a typo is refused before anything is allocated
        ({"model": {"n_layer": 1_000_000}}, "model.n_layer"),
        ({"model": {"n_embd": 2**17, "n_head": 4}}, "model.n_embd"),
        ({"model": {"n_head": 2048}}, "model.n_head"),
        ({"model": {"vocab_size": 2**16 + 1}}, "model.vocab_size"),  # shards hold uint16 ids
        ({"model": {"seq_len": 2**21}}, "model.seq_len"),
        ({"train": {"batch_size": 2**21}}, "train.batch_size"),
        ({"train": {"steps": 10**8}}, "train.steps"),  # 8-digit checkpoint names
        ({"eval": {"micro_batch": 10**6}}, "eval.micro_batch"),
        ({"seed": 2**64}, "seed"),
        ({"optim": {"beta1": 1.0}}, "optim.beta1"),  # AdamW refuses it
        ({"optim": {"beta2": 1}}, "optim.beta2"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        make(**raw)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_missing_run_is_named():
    with pytest.raises(ConfigError, match="^run: missing required key"):
        config_from_dict({"data": {"dir": "x"}})


def test_yaml_round_trip_and_lambda_key(tmp_path):
    cfg = make(method={"name": "muloss", "lambda": "1e-4"}, optim={"lr": "3e-3"})  # YAML 1.1 strings
    assert cfg.method.lambda_ == 1e-4 and cfg.optim.lr == 3e-3
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert "lambda: 0.0001" in path.read_text()
    assert load_config(path) == cfg


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"steps": -1}}))
    with pytest.raises(ConfigError, match=r"config\.yaml: train\.steps: -1 is out of range"):
        load_config(path)


def test_auto_micro_batch_is_largest_divisor_under_the_cap():
    cfg = make(train={"batch_size": 64})
    assert micro_batch_size(cfg, world_size=1, token_cap=32768) == 16  # 16 x 2048 tokens
    assert micro_batch_size(cfg, world_size=4, token_cap=32768) == 16
    assert micro_batch_size(cfg, world_size=1, token_cap=3 * 2048) == 2  # largest divisor <= 3
    cfg = make(train={"batch_size": 12}, model={"seq_len": 16})
    assert micro_batch_size(cfg, world_size=2, token_cap=10**6) == 6
    with pytest.raises(ConfigError, match="world size"):
        micro_batch_size(make(train={"batch_size": 6}), world_size=4, token_cap=32768)


def test_resume_hash_ignores_bookkeeping_but_not_math():
    base = make()
    assert make(train={"log_every": 7, "checkpoint_every": 3}).resume_hash() == base.resume_hash()
    assert make(data={"dir": "elsewhere"}).resume_hash() == base.resume_hash()
    assert make(optim={"warmup": 10}).resume_hash() != base.resume_hash()
    assert make(method={"name": "mucentering"}).resume_hash() != base.resume_hash()


def test_upper_bounds_allow_the_paper_and_say_the_bound():
    make(model={"n_layer": 1024, "vocab_size": 2**16, "seq_len": 2**20}, train={"steps": 10**8 - 1})
    with pytest.raises(ConfigError, match=r"^optim\.beta1: 1\.0 is out of range \(must be < 1\.0\)$"):
        make(optim={"beta1": 1.0})
    make(optim={"lr": 1e39, "min_lr": 0})  # no upper bound: an lr that overflows trains as diverged


def with_new_optim_key(cfg, value=None):
    """cfg with an optim key added since, as a later issue would add it (default 0.5)."""
    extended = dataclasses.make_dataclass(
        "OptimConfig", [("new_knob", float, _key(0.5))], bases=(OptimConfig,)
    )
    values = {f.name: getattr(cfg.optim, f.name) for f in dataclasses.fields(OptimConfig)}
    optim = extended(**values) if value is None else extended(**values, new_knob=value)
    return dataclasses.replace(cfg, optim=optim)


@pytest.mark.parametrize("sections", [{}, {"optim": {"warmup": 10}, "model": {"tied": True}}])
def test_a_new_key_with_its_default_leaves_the_resume_hashes_unchanged(sections):
    cfg = make(**sections)
    assert with_new_optim_key(cfg).resume_hashes() == cfg.resume_hashes()
    new, legacy = with_new_optim_key(cfg, value=0.7).resume_hashes()  # new math: new hashes
    assert new != cfg.resume_hash() and legacy != cfg.legacy_resume_hash()


def test_resume_hash_leaves_defaults_out():
    assert make(optim={"warmup": 5000}).resume_hash() == make().resume_hash()  # 5000 is the default
    assert make(optim={"warmup": 4999}).resume_hash() != make().resume_hash()


@pytest.mark.parametrize(
    "sections, old_hash",
    [  # what the code that hashed every key, defaults included, recorded in checkpoints
        ({}, "056a4cfbd2f1f09c"),
        ({"model": {"tied": True}, "method": {"name": "mucentering"}}, "b1410a2ef33a2098"),
        ({"method": {"name": "zloss", "lambda": 1e-4}, "optim": {"warmup": 10}}, "f0afdb58295d5bc4"),
    ],
)
def test_the_legacy_hash_is_what_old_checkpoints_carry(sections, old_hash):
    assert make(**sections).legacy_resume_hash() == old_hash
    assert with_new_optim_key(make(**sections)).legacy_resume_hash() == old_hash
