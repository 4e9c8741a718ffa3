"""What the analysis steps read from an experiment file: scales (params, L0), vocabulary, comparisons."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from workflow.scripts.runids import Member, parse_member

DEFAULT_VOCAB = 50304


class Experiment:
    def __init__(self, raw: dict):
        self.raw = raw
        self.name = raw.get("experiment", "experiment")
        self.scales: dict = raw.get("scales") or {}
        model = (raw.get("protocol") or {}).get("model") or {}
        self.vocab_size = int(model.get("vocab_size", DEFAULT_VOCAB))
        self.comparisons: dict[str, list[Member]] = {
            name: [parse_member(m) for m in members]
            for name, members in (raw.get("comparisons") or {}).items()
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

    def comparison(self, name: str) -> list[Member]:
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
