"""The experiment file turned into runs: shared by the Snakefile, plan and the tests.

The runs are the union of the grids' products, one per run id. A grid's product is over its
scales, methods (and their values), lrs, seeds, tying, each of its `axes` (a run-config key and
its values) and each of its `zip` groups (keys whose i-th values go together). Each run's config
is the experiment's `protocol`, then the scale's architecture, then the grid's and the method's
`overrides`, then the run's own coordinates (method, value, lr, seed, tying, axis values).
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import AXES, ConfigError, axis_default, check_axis_value, config_from_dict
from trainer.contract import METHODS, ExperimentDir
from workflow.scripts.experiment import Comparison, parse_comparison
from workflow.scripts.runids import RUN_WILDCARD, RunKey, method_param, parse_run_id

# Every name of the experiment file that becomes a path component or a shell word: a letter or
# digit, then letters, digits, '.', '_', '-' (never '..', '/', a space or a quote).
SAFE_NAME = r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
SAFE_PATH = rf"{SAFE_NAME}(/{SAFE_NAME})*"  # published files: relative, below resources/published/
ARCH_KEYS = ("n_layer", "n_embd", "n_head")
DEFAULT_RESOURCES = {"gpu": 0, "cpus_per_gpu": 4, "mem_mb": 4000, "runtime": 60}


class ExperimentError(ValueError):
    """An experiment file that cannot be planned: the message names the key."""


def one_of(names) -> str:
    """A wildcard constraint (a regular expression) that matches exactly these names."""
    return "|".join(re.escape(n) for n in names)


def check_name(where: str, name, pattern: str = SAFE_NAME) -> None:
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        kind = "path (names joined by '/')" if pattern == SAFE_PATH else "name"
        raise ExperimentError(
            f"{where}: {name!r} is not a safe {kind}: a letter or digit, then letters, digits, "
            "'.', '_' or '-' (no '..', at most 100 characters)"
        )


def check_names(config: dict) -> None:
    """Names are data, never code or a way out of the project: checked before anything runs."""
    check_name("experiment", config.get("experiment"))
    for key in ("scales", "comparisons"):
        for name in config.get(key) or {}:
            check_name(key, name)
    if "dataset" in (config.get("data") or {}):
        check_name("data.dataset", config["data"]["dataset"])
    for i, entry in enumerate(config.get("published") or []):
        check_name(f"published[{i}].file", entry.get("file"), SAFE_PATH)


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def coerce_numbers(config: dict) -> None:
    """YAML 1.1 reads `1e-3` as a string: turn such strings in the grids into numbers, in place,
    before the schema checks types (anything that is not a number stays and is rejected)."""

    def number(x):
        if isinstance(x, str):
            try:
                return float(x)
            except ValueError:
                return x
        return x

    for scale in (config.get("scales") or {}).values():
        if isinstance(scale, dict):
            for key in ("params", "L0", "throughput"):
                if key in scale:
                    scale[key] = number(scale[key])
    for grid in config.get("grids") or []:
        if not isinstance(grid, dict):
            continue
        if isinstance(grid.get("lrs"), list):
            grid["lrs"] = [number(x) for x in grid["lrs"]]
        for spec in (grid.get("methods") or {}).values():
            if isinstance(spec, dict):
                for key, values in spec.items():
                    if key != "overrides" and isinstance(values, list):
                        spec[key] = [number(x) for x in values]


def check_run_id(where: str, key: RunKey) -> None:
    """A run id is a path component and a shell word: it must be one the `run` wildcard matches
    and that reads back as the same run (an lr of .inf would give `lrinf`)."""
    run_id = key.run_id
    try:
        same = re.fullmatch(RUN_WILDCARD, run_id) and parse_run_id(run_id) == key
    except ValueError:
        same = False
    if not same:
        raise ExperimentError(f"{where}: run id {run_id!r} is not a valid run id (a value out of range?)")


@dataclass
class Run:
    key: RunKey
    grid: int
    overrides: dict
    axis_values: dict = field(default_factory=dict)  # every axis of its grid, defaults included

    @property
    def id(self) -> str:
        return self.key.run_id


class Grid:
    """All runs of an experiment, their configs and resources."""

    def __init__(self, config: dict):
        check_names(config)
        self.config = config
        self.experiment = config["experiment"]
        self.layout = ExperimentDir(self.experiment)
        self.scales: dict = config.get("scales") or {}
        self.runs: dict[str, Run] = {}
        self.axes: list[str] = []  # every swept run-config key, in order of appearance
        for i, grid in enumerate(config.get("grids") or []):
            self._expand(i, grid)
        self.comparisons: dict[str, Comparison] = {}
        for name, spec in (config.get("comparisons") or {}).items():
            try:
                self.comparisons[name] = parse_comparison(name, spec)
            except ValueError as err:
                raise ExperimentError(f"comparisons.{name}: {err}") from None
            self._check_comparison_axes(self.comparisons[name])
        self._check_protocol_everywhere()  # before any job

    def _expand(self, i: int, grid: dict) -> None:
        where = f"grids[{i}]"
        for scale in grid["scales"]:
            if scale not in self.scales:
                raise ExperimentError(
                    f"{where}.scales: unknown scale {scale!r} (known: {', '.join(self.scales)})"
                )
            missing = [k for k in ("n_layer", "n_embd") if k not in self.scales[scale]]
            if missing:
                raise ExperimentError(f"scales.{scale}: {' and '.join(missing)} needed to train it")
        for method, spec in grid["methods"].items():
            spec = spec or {}
            if method not in METHODS:
                raise ExperimentError(
                    f"{where}.methods: unknown method {method!r} (known: {', '.join(METHODS)})"
                )
            param = method_param(method)
            extra = sorted(set(spec) - {"overrides", param})
            if extra:
                raise ExperimentError(
                    f"{where}.methods.{method}.{extra[0]}: not a parameter of {method} "
                    f"({'its parameter: ' + param if param else 'it has none'})"
                )
            values = spec.get(param) if param else [None]
            if param and not values:
                raise ExperimentError(f"{where}.methods.{method}.{param}: {method} needs a list of values")
            overrides = deep_merge(grid.get("overrides") or {}, spec.get("overrides") or {})
            axis_points = self._axis_points(where, grid, overrides)
            for scale, value, lr, seed, tied, point in itertools.product(
                grid["scales"], values, grid["lrs"], grid["seeds"], grid.get("tied", [False]), axis_points
            ):
                key = RunKey(
                    scale,
                    method,
                    None if value is None else float(value),
                    float(lr),
                    int(seed),
                    bool(tied),
                    RunKey.axes_of(point),
                )
                check_run_id(where, key)
                if key.run_id in self.runs:
                    raise ExperimentError(
                        f"{where}: run {key.run_id} is already made by grids[{self.runs[key.run_id].grid}] "
                        "(grids that differ only in `overrides` make the same runs: sweep the key as an axis)"
                    )
                self.runs[key.run_id] = Run(key, i, overrides, point)

    def _axis_points(self, where: str, grid: dict, overrides: dict) -> list[dict[str, Any]]:
        """The grid's axis values, one dict per point of the product of `axes` and `zip` groups."""
        groups = [[{key: v} for v in values] for key, values in (grid.get("axes") or {}).items()]
        for j, group in enumerate(grid.get("zip") or []):
            lengths = {len(values) for values in group.values()}
            if len(lengths) != 1:
                raise ExperimentError(f"{where}.zip[{j}]: the lists differ in length ({sorted(lengths)})")
            groups.append([dict(zip(group, row, strict=True)) for row in zip(*group.values(), strict=True)])
        keys = [key for group in groups for key in group[0]]
        for key in keys:
            if key not in AXES:
                raise ExperimentError(
                    f"{where}.axes: {key!r} is not a run-config key that can be swept (see config/README.md "
                    "'Axes'; lr, seed, method and tying have their own grid keys)"
                )
            section, _, name = key.partition(".")
            if name in (overrides.get(section) or {}):
                raise ExperimentError(f"{where}: {key} is both an axis and an override")
            if key not in self.axes:
                self.axes.append(key)
        if len(set(keys)) != len(keys):
            raise ExperimentError(f"{where}: an axis appears twice in axes and zip")
        points = []
        for combination in itertools.product(*groups):
            point = {k: v for part in combination for k, v in part.items()}
            try:
                points.append({k: check_axis_value(k, v) for k, v in point.items()})
            except ConfigError as err:
                raise ExperimentError(f"{where}.axes: {err}") from None
        return points

    def _check_comparison_axes(self, comparison: Comparison) -> None:
        where = f"comparisons.{comparison.name}"
        for key in (comparison.rows, comparison.over):
            if key in AXES and key not in self.axes:
                raise ExperimentError(
                    f"{where}: {key} is not an axis of any grid (axes: {self.axes or 'none'})"
                )
        for member in comparison.members:
            for key, _ in member.pins:
                if key != "scale" and key not in self.axes:
                    raise ExperimentError(
                        f"{where}: member {member.text!r} pins {key}, which no grid sweeps (axes: {self.axes or 'none'})"
                    )

    def _check_protocol_everywhere(self) -> None:
        seen = set()
        for run in self.runs.values():
            signature = (run.key.scale, run.grid, run.key.method, run.key.axes)
            if signature not in seen:
                seen.add(signature)
                self.run_config(run.id)

    # --- one run ---------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> str:
        return self.layout.run(run_id).path

    @functools.cache  # noqa: B019 (one grid per workflow; the configs are asked for again and again)
    def run_config(self, run_id: str) -> dict:
        """The resolved run config (a plain dict), checked by the trainer's own loader."""
        run = self.runs[run_id]
        key = run.key
        scale = self.scales[key.scale]
        data = self.config["data"]
        base = deep_merge(
            {
                "data": {
                    "dir": data["dir"],
                    **{k: data[k] for k in ("train_pattern", "val_pattern") if k in data},
                }
            },
            self.config.get("protocol") or {},
        )
        base = deep_merge(base, {"model": {k: scale[k] for k in ARCH_KEYS if k in scale}})
        base = deep_merge(base, run.overrides)
        for dotted, value in run.axis_values.items():
            section, _, name = dotted.partition(".")
            base = deep_merge(base, {section: {name: value}})
        method = {"name": key.method}
        if method_param(key.method):
            method[method_param(key.method)] = key.value
        base = deep_merge(
            base,
            {
                "run": run_id,
                "seed": key.seed,
                "method": method,
                "model": {"tied": key.tied},
                "optim": {"lr": key.lr},
            },
        )
        try:
            config_from_dict(base)
        except ConfigError as err:
            raise ExperimentError(f"run {run_id} (protocol, scales.{key.scale}, overrides): {err}") from None
        return base

    def axis_value(self, run_id: str, key: str) -> Any:
        """The run's value of a run-config key (swept or not), or of `scale`."""
        if key == "scale":
            return self.runs[run_id].key.scale
        section, _, name = key.partition(".")
        config = self.run_config(run_id)
        if name in (config.get(section) or {}):
            return check_axis_value(key, config[section][name])
        return axis_default(key)

    def resources(self, scale: str) -> dict:
        return {**DEFAULT_RESOURCES, **(self.scales[scale].get("resources") or {})}

    def tokens(self, run_id: str) -> int:
        cfg = self.run_config(run_id)

        def value(key: str) -> int:  # as the run config sets it, else the loader's default
            section, name = key.split(".")
            return int(cfg.get(section, {}).get(name, axis_default(key)))

        return value("train.steps") * value("train.batch_size") * value("model.seq_len")

    def gpu_hours(self, run_id: str) -> float:
        """GPU-hours of one run from the scale's throughput (tokens/s per GPU); NaN if unknown."""
        throughput = self.scales[self.runs[run_id].key.scale].get("throughput")
        return self.tokens(run_id) / float(throughput) / 3600 if throughput else math.nan

    # --- comparisons -------------------------------------------------------------------------

    def members_runs(self, comparison: str) -> list[str]:
        """Run ids of the comparison's members, in grid order."""
        members = self.comparisons[comparison].members
        return [r.id for r in self.runs.values() if any(self._matches(m, r) for m in members)]

    def absent_members(self, comparison: str) -> list[str]:
        return [
            m.text
            for m in self.comparisons[comparison].members
            if not any(self._matches(m, r) for r in self.runs.values())
        ]

    def _matches(self, member, run: Run) -> bool:
        return member.matches(
            run.key.method, run.key.value, run.key.tied, lambda key: self.axis_value(run.id, key)
        )


def read_yaml(path: str | Path) -> dict:
    """An experiment file; a syntax error names the file, line and column (Snakemake's own
    `--configfile` loader says only "not valid JSON or YAML")."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        context = f" ({err.context} at line {err.context_mark.line + 1})" if err.context_mark else ""
        raise ExperimentError(f"{path}:{mark.line + 1}:{mark.column + 1}: {err.problem}{context}") from None
    if not isinstance(config, dict):
        raise ExperimentError(f"{path}: not a mapping of keys (experiment, scales, ...)")
    return config


def load(path: str | Path) -> Grid:
    config = read_yaml(path)
    coerce_numbers(config)
    return Grid(config)
