"""Run ids and comparison members: the one place that knows their spelling.

Run id: `{scale}-{method}[-{value}]-lr{lr}-s{seed}[-tied]`, value `g{lambda}` (zloss, muloss) or
`c{cap}` (softcap); numbers in the shortest text that round-trips (Python's repr of the float,
30.0 -> 30). Member: `method[:value][@tied]`, e.g. `zloss:1e-4`, `softcap:30@tied`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

VALUE_PREFIX = {"zloss": "g", "muloss": "g", "softcap": "c"}  # methods with a hyper-parameter
METHOD_PARAM = {"zloss": "lambda", "muloss": "lambda", "softcap": "cap"}
# The `run` wildcard of the workflow: a run id and nothing else (no '/', no other file name; a
# path component and a shell word that needs no quoting: letters, digits, '.', '-', '+').
RUN_WILDCARD = r"[A-Za-z0-9][A-Za-z0-9.]*-[a-z]+(-[gc][0-9.e+-]+)?-lr[0-9.e+-]+-s\d+(-tied)?"
RUN_ID = re.compile(
    r"^(?P<scale>[A-Za-z0-9][A-Za-z0-9.]*)-(?P<method>[a-z]+)(?:-(?P<prefix>[gc])(?P<value>[0-9.e+-]+?))?"
    r"-lr(?P<lr>[0-9.e+-]+?)-s(?P<seed>\d+)(?P<tied>-tied)?$"
)


def fmt(x: float) -> str:
    """Shortest text that round-trips: 0.0003, 1e-05, 30.0 -> 30."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


@dataclass(frozen=True)
class RunKey:
    scale: str
    method: str
    value: float | None
    lr: float
    seed: int
    tied: bool

    @property
    def run_id(self) -> str:
        parts = [self.scale, self.method]
        if self.value is not None:
            parts.append(VALUE_PREFIX[self.method] + fmt(self.value))
        parts += [f"lr{fmt(self.lr)}", f"s{self.seed}"]
        return "-".join(parts) + ("-tied" if self.tied else "")


def parse_run_id(run_id: str) -> RunKey:
    m = RUN_ID.match(run_id)
    if not m:
        raise ValueError(
            f"{run_id!r} is not a run id ({{scale}}-{{method}}[-{{value}}]-lr{{lr}}-s{{seed}}[-tied])"
        )
    method = m["method"]
    if (m["value"] is None) != (method not in VALUE_PREFIX) or (
        m["prefix"] and m["prefix"] != VALUE_PREFIX[method]
    ):
        raise ValueError(f"{run_id!r}: method {method} does not match its value part")
    key = RunKey(
        m["scale"],
        method,
        float(m["value"]) if m["value"] else None,
        float(m["lr"]),
        int(m["seed"]),
        bool(m["tied"]),
    )
    if key.run_id != run_id:
        raise ValueError(f"{run_id!r} is not in canonical form ({key.run_id!r})")
    return key


@dataclass(frozen=True)
class Member:
    """A comparison member: a method, its value if it has one, and tying."""

    text: str
    method: str
    value: float | None
    tied: bool

    def matches(self, method: str, value, tied) -> bool:
        if method != self.method or bool(tied) != self.tied:
            return False
        if self.value is None:
            return value is None or (isinstance(value, float) and math.isnan(value))
        return (
            value is not None
            and not (isinstance(value, float) and math.isnan(value))
            and math.isclose(float(value), self.value, rel_tol=1e-9)
        )


def parse_member(text: str) -> Member:
    body, _, tied = str(text).partition("@")
    if tied not in ("", "tied"):
        raise ValueError(f"member {text!r}: only '@tied' may follow '@'")
    method, _, value = body.partition(":")
    if method in VALUE_PREFIX and not value:
        raise ValueError(f"member {text!r}: {method} needs a value ({method}:<{METHOD_PARAM[method]}>)")
    if method not in VALUE_PREFIX and value:
        raise ValueError(f"member {text!r}: {method} takes no value")
    try:
        number = float(value) if value else None
    except ValueError:
        raise ValueError(f"member {text!r}: {value!r} is not a number") from None
    return Member(str(text), method, number, tied == "tied")
