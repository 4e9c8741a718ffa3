"""Run ids and comparison members: the one place that knows their spelling.

Run id: `{scale}-{method}[-{code}{value}]-lr{lr}-s{seed}[-tied][-{axis code}_{axis value}...]`
- the method's hyper-parameter, if it has one, with its code from the registry (trainer/contract.py
  METHODS: g = lambda of zloss and muloss, c = cap of softcap);
- one part per swept run-config key (a grid axis) whose value differs from the run-config default,
  ordered by code; codes are in trainer/config.py (`code=`) and config/README.md ("Axes").
Numbers are in the shortest text that round-trips (Python's repr of the float, 30.0 -> 30), booleans
`true`/`false`. A run id is parsed back by one codec: parse_run_id(key.run_id) == key, and an id
that is not in canonical form is refused.

Member: `method[:value][@tied][,key=value...]`, e.g. `zloss:1e-4`, `softcap:30@tied`,
`baseline,optim.schedule=wsd`; a pin fixes an axis (or `scale`) to one value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from trainer.config import AXES, ConfigError, axis_code, axis_default, axis_type, check_axis_value
from trainer.contract import METHODS

CODE_TO_AXIS = {axis_code(k): k for k in AXES}
SCALE = r"[A-Za-z0-9][A-Za-z0-9.]*"
AXIS_VALUE = r"[A-Za-z0-9][A-Za-z0-9.+-]*"  # also a string axis value must be one of these
_AXIS_PART = rf"-[A-Za-z][A-Za-z0-9]*_{AXIS_VALUE}"
_ID = (
    rf"(?P<scale>{SCALE})-(?P<method>[a-z]+)(?:-(?P<prefix>[a-z])(?P<value>[0-9.e+-]+?))?"
    rf"-lr(?P<lr>[0-9.e+-]+?)-s(?P<seed>\d+)(?P<tied>-tied)?(?P<axes>(?:{_AXIS_PART})*)"
)
RUN_ID = re.compile(f"^{_ID}$")
# The `run` wildcard of the workflow: a run id and nothing else (no '/', no other file name; a
# path component and a shell word that needs no quoting: letters, digits, '.', '_', '-', '+').
RUN_WILDCARD = re.sub(r"\?P<\w+>", "", _ID)


def fmt(x: float) -> str:
    """Shortest text that round-trips: 0.0003, 1e-05, 30.0 -> 30."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def method_code(method: str) -> str | None:
    """The run-id code of the method's hyper-parameter (None: the method has none)."""
    params = METHODS[method].params
    return params[0].code if params else None


def method_param(method: str) -> str | None:
    params = METHODS[method].params
    return params[0].key if params else None


def format_axis_value(key: str, value: Any) -> str:
    kind = axis_type(key)
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float":
        return fmt(value)
    return str(value)


def parse_axis_value(key: str, text: str) -> Any:
    """The value of an axis from its text in a run id or a member pin (as YAML would read it)."""
    value = yaml.safe_load(text) if axis_type(key) != "str" else text
    try:
        return check_axis_value(key, value)
    except ConfigError as err:
        raise ValueError(str(err)) from None


@dataclass(frozen=True)
class RunKey:
    scale: str
    method: str
    value: float | None
    lr: float
    seed: int
    tied: bool
    axes: tuple[tuple[str, Any], ...] = ()  # (dotted key, value) away from the default, by code

    @staticmethod
    def axes_of(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The axes part of a key from a run's axis values: defaults left out, ordered by code."""
        return tuple(
            sorted(
                ((k, v) for k, v in values.items() if v != axis_default(k)), key=lambda kv: axis_code(kv[0])
            )
        )

    @property
    def run_id(self) -> str:
        parts = [self.scale, self.method]
        if self.value is not None:
            parts.append(method_code(self.method) + fmt(self.value))
        parts += [f"lr{fmt(self.lr)}", f"s{self.seed}"]
        if self.tied:
            parts.append("tied")
        parts += [f"{axis_code(k)}_{format_axis_value(k, v)}" for k, v in self.axes]
        return "-".join(parts)

    def axis_value(self, key: str) -> Any:
        return dict(self.axes).get(key, axis_default(key))


def parse_run_id(run_id: str) -> RunKey:
    m = RUN_ID.match(run_id)
    if not m:
        raise ValueError(
            f"{run_id!r} is not a run id "
            "({scale}-{method}[-{value}]-lr{lr}-s{seed}[-tied][-{axis code}_{value}...])"
        )
    method = m["method"]
    if method not in METHODS:
        raise ValueError(f"{run_id!r}: unknown method {method!r}")
    if (m["value"] is None) != (method_code(method) is None) or (
        m["prefix"] and m["prefix"] != method_code(method)
    ):
        raise ValueError(f"{run_id!r}: method {method} does not match its value part")
    axes = []
    for part in re.split(r"-(?=[A-Za-z][A-Za-z0-9]*_)", m["axes"])[1:]:
        code, _, text = part.partition("_")
        if code not in CODE_TO_AXIS:
            raise ValueError(f"{run_id!r}: unknown axis code {code!r}")
        axes.append((CODE_TO_AXIS[code], parse_axis_value(CODE_TO_AXIS[code], text)))
    key = RunKey(
        m["scale"],
        method,
        float(m["value"]) if m["value"] else None,
        float(m["lr"]),
        int(m["seed"]),
        bool(m["tied"]),
        RunKey.axes_of(dict(axes)),
    )
    if key.run_id != run_id:
        raise ValueError(f"{run_id!r} is not in canonical form ({key.run_id!r})")
    return key


@dataclass(frozen=True)
class Member:
    """A comparison member: a method, its value if it has one, tying, and pinned axis values."""

    text: str
    method: str
    value: float | None
    tied: bool
    pins: tuple[tuple[str, Any], ...] = ()  # (axis key or "scale", value)

    def matches(self, method: str, value, tied, get=lambda key: None) -> bool:
        """Does a run with these coordinates belong to the member? `get(key)` gives the run's value
        of a pinned axis."""
        if method != self.method or bool(tied) != self.tied:
            return False
        if any(get(key) != pinned for key, pinned in self.pins):
            return False
        if self.value is None:
            return value is None or (isinstance(value, float) and math.isnan(value))
        return (
            value is not None
            and not (isinstance(value, float) and math.isnan(value))
            and math.isclose(float(value), self.value, rel_tol=1e-9)
        )


def parse_member(text: str) -> Member:
    head, *pin_texts = str(text).split(",")
    body, _, tied = head.partition("@")
    if tied not in ("", "tied"):
        raise ValueError(f"member {text!r}: only '@tied' may follow '@'")
    method, _, value = body.partition(":")
    if method not in METHODS:
        raise ValueError(f"member {text!r}: unknown method {method!r} (known: {', '.join(METHODS)})")
    if method_param(method) and not value:
        raise ValueError(f"member {text!r}: {method} needs a value ({method}:<{method_param(method)}>)")
    if not method_param(method) and value:
        raise ValueError(f"member {text!r}: {method} takes no value")
    try:
        number = float(value) if value else None
    except ValueError:
        raise ValueError(f"member {text!r}: {value!r} is not a number") from None
    pins = []
    for pin in pin_texts:
        key, eq, pinned = pin.strip().partition("=")
        if not eq or (key != "scale" and key not in AXES):
            raise ValueError(f"member {text!r}: {pin!r} is not key=value with an axis key or scale")
        pins.append((key, pinned if key == "scale" else parse_axis_value(key, pinned)))
    return Member(str(text), method, number, tied == "tied", tuple(pins))
