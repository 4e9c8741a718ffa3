"""What the analysis steps read from an experiment file: scales (params, L0), vocabulary, axes,
comparisons.

A comparison is a list of members, or a mapping with `members` (a list, labelled as written,
or a mapping {label: member}) and the table options:
  rows: the axis of the table rows (default `scale`; or `lr`, or a swept run-config key)
  over: the axis the best value is taken over, the x axis of the figures (default `lr`)
  reference: what rel_time is relative to: a member's label, else a member as written (default
    `baseline`), with each member's tying and pins where it sets none of its own
  where: pins every member shares, e.g. {scale: 124M} (written once instead of in each member)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer.config import AXES
from workflow.scripts.runids import Member, parse_member

DEFAULT_VOCAB = 50304
COORDINATES = ("scale", "lr")  # axes every run has besides the swept run-config keys


@dataclass(frozen=True)
class Comparison:
    name: str
    members: tuple[Member, ...]
    rows: str = "scale"
    over: str = "lr"
    reference: str = "baseline"

    def reference_member(self) -> Member:
        """What rel_time is relative to: the member labelled `reference`, else that member text."""
        labelled = [m for m in self.members if m.text == self.reference]
        return labelled[0] if labelled else parse_member(self.reference)


def parse_comparison(name: str, spec) -> Comparison:
    """A comparison from the experiment file; a ValueError names what is wrong."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"members", "rows", "over", "reference", "where"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (known: members, rows, over, reference, where)")
        options = {k: spec[k] for k in ("rows", "over", "reference") if k in spec}
        members = spec.get("members")
        where = spec.get("where") or {}
    else:
        options, members, where = {}, spec, {}
    if isinstance(members, dict):  # {label: member}: the label heads the table column and the legend
        labelled = [(str(label), text) for label, text in members.items()]
        for label, _ in labelled:
            if (
                not label.strip()
                or "\n" in label
                or label in COORDINATES
                or label in AXES
                or label == "params"
            ):
                raise ValueError(
                    f"members: {label!r} cannot label a member (empty, a line break, or a column name)"
                )
    elif isinstance(members, list) and members:
        labelled = [(str(text), text) for text in members]  # labelled as written
    else:
        raise ValueError("members: a list of at least one member, or a mapping of labels to members")
    for key in ("rows", "over"):
        value = options.get(key)
        if value is not None and value not in COORDINATES and value not in AXES:
            raise ValueError(f"{key}: {value!r} is not scale, lr or a run-config axis")
    if options.get("rows", "scale") == options.get("over", "lr"):
        raise ValueError("rows and over must be different axes")
    if not isinstance(where, dict):
        raise ValueError("where: a mapping of axis keys (or scale) to one value each")
    shared = ",".join(f"{k}={v}" for k, v in where.items())
    reference = options.get("reference", "baseline")
    if reference not in dict(labelled):
        parse_member(reference)  # a member as written, if it names no member's label
    parsed = []
    for label, text in labelled:
        member = parse_member(f"{text},{shared}" if shared else text)
        parsed.append(dataclasses.replace(member, text=label))
    return Comparison(name, tuple(parsed), **options)


class Experiment:
    def __init__(self, raw: dict):
        self.raw = raw
        self.name = raw.get("experiment", "experiment")
        self.scales: dict = raw.get("scales") or {}
        model = (raw.get("protocol") or {}).get("model") or {}
        self.vocab_size = int(model.get("vocab_size", DEFAULT_VOCAB))
        self.axes: list[str] = list(raw.get("axes") or [])  # the swept run-config keys
        self.comparisons: dict[str, Comparison] = {
            name: parse_comparison(name, spec) for name, spec in (raw.get("comparisons") or {}).items()
        }

    @classmethod
    def load(cls, path: str | Path) -> Experiment:
        return cls(yaml.safe_load(Path(path).read_text()))

    def L0(self, scale: str) -> float:
        """Loss at initialisation: the scale's L0, default ln(padded V)."""
        value = self.scales.get(scale, {}).get("L0")
        return float(value) if value is not None else math.log(self.vocab_size)

    def params(self, scale: str) -> float | None:
        value = self.scales.get(scale, {}).get("params")
        return float(value) if value is not None else None

    def comparison(self, name: str) -> Comparison:
        if name not in self.comparisons:
            raise KeyError(
                f"comparison {name!r} is not in the experiment file (known: {', '.join(self.comparisons)})"
            )
        return self.comparisons[name]


def comparison_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every per-comparison analysis step takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", required=True, help="runs.csv")
    parser.add_argument("--experiment", required=True, help="experiment file (scales, comparisons)")
    parser.add_argument("--comparison", required=True)
    parser.add_argument("--out-dir", required=True)
    return parser
