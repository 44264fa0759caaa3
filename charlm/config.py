"""Typed configuration: one source of defaults, overridden by TOML files and the command line.

A run's config has three sections, ``model``, ``data`` and ``train``. Files in ``configs/``
and ``--set section.key=value`` options only override fields that exist; an unknown key, a
wrong type or a value out of range is a :class:`ConfigError` naming the valid choices.

Over 300 lines: one concept, the fields with their defaults and ranges, and their reading
from files and options, which read best side by side.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from charlm.data.text import NEWLINES, check_encoding
from charlm.errors import ConfigError, DataError
from charlm.model.cells import NAMES as CELLS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    cell: str = "lstm"
    embed_size: int = 128
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0


@dataclass
class DataConfig:
    val_fraction: float = 0.1
    encoding: str = "utf-8"
    # "strict" refuses undecodable bytes; "replace" maps them to U+FFFD.
    errors: str = "strict"
    # "normalize" reads CRLF and CR line endings as \n (as Python's text mode); or "keep".
    newline: str = "normalize"


@dataclass
class TrainConfig:
    batch_size: int = 64
    seq_len: int = 64
    lr: float = 3e-3
    # Cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Limits: training stops at whichever comes first; 0 means no limit.
    max_steps: int = 2000
    max_time: float = 0.0
    max_epochs: float = 0.0
    # "auto": with a time budget (max_time), choose the model, batch, window, learning rate
    # and dropout for it on this device (charlm.training.sizing). "fixed": train the shape configured.
    # The front ends (charlm train, charlm.train()) make it "auto" unless it or a shape field
    # is given; a Config built in Python trains its own shape.
    size: str = "fixed"
    # Evaluate / log every N steps; 0 paces them to the run's limits (charlm.training.pacing).
    eval_every: int = 0
    log_every: int = 0
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    # CPU threads for torch; 0 picks the number of physical cores available.
    threads: int = 0
    # Evaluation: number of parallel streams and window length over the validation split.
    # 64 streams evaluate 1.4x faster than 32 (bf16, Zen 4) for +0.0014 nats of cold starts.
    eval_streams: int = 64
    eval_seq_len: int = 256
    # Samples printed at each evaluation (0 chars turns them off).
    sample_chars: int = 200
    sample_every: int = 0
    # Stop after this many evaluations without a new best (0: never).
    patience: int = 0
    # Keep this many step-numbered checkpoints besides last.pt and best.pt.
    keep_last: int = 0
    # "stop" ends training on a NaN/inf loss keeping the last good checkpoint; "skip" drops
    # the step and goes on.
    on_nan: str = "stop"
    # Also write TensorBoard event files into the run directory (the tensorboard extra).
    tensorboard: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        apply_dict(cfg, data, source)
        return cfg


# Ranges checked by validate(): (low, high, low_inclusive). None means unbounded.
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "model.embed_size": (1, 65536, True),
    "model.hidden_size": (1, 65536, True),
    "model.num_layers": (1, 64, True),
    "model.dropout": (0.0, 1.0, True),
    "data.val_fraction": (0.0, 0.9, False),
    "train.batch_size": (1, 1 << 20, True),
    "train.seq_len": (1, 1 << 20, True),
    "train.lr": (0.0, 10.0, False),
    "train.min_lr_ratio": (0.0, 1.0, True),
    "train.warmup_steps": (0, None, True),
    "train.weight_decay": (0.0, 10.0, True),
    "train.grad_clip": (0.0, None, True),
    "train.max_steps": (0, None, True),
    "train.max_time": (0.0, None, True),
    "train.max_epochs": (0.0, None, True),
    "train.eval_every": (0, None, True),
    "train.log_every": (0, None, True),
    "train.seed": (0, 2**63 - 1, True),
    "train.threads": (0, 1024, True),
    "train.eval_streams": (1, 1 << 16, True),
    "train.eval_seq_len": (1, 1 << 20, True),
    "train.sample_chars": (0, 1 << 20, True),
    "train.sample_every": (0, None, True),
    "train.patience": (0, None, True),
    "train.keep_last": (0, None, True),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "model.cell": CELLS,
    "data.errors": ("strict", "replace"),
    "data.newline": NEWLINES,
    "train.precision": PRECISIONS,
    "train.size": ("auto", "fixed"),
    "train.on_nan": ("stop", "skip"),
}


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Check a value against a field type; ints are accepted where floats are expected."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an int beyond any float: out of every range anyway
            ok = False
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _field_types(section: Any) -> dict[str, type]:
    types = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: types[f.type] if isinstance(f.type, str) else f.type for f in fields(section)}


def apply_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> None:
    """Override ``cfg`` in place from nested ``{section: {key: value}}`` data."""
    sections = _sections(cfg)
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{name}]; valid sections: {', '.join(sections)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys")
        types = _field_types(sections[name])
        for key, value in values.items():
            if key not in types:
                raise ConfigError(
                    f"{source}: unknown key {name}.{key}; valid keys in [{name}]: "
                    + ", ".join(types)
                )
            setattr(sections[name], key, _coerce(f"{source}: {name}.{key}", value, types[key]))


def parse_value(text: str, kind: type) -> Any:
    """Parse a command-line string as a value of ``kind``."""
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text.replace("_", ""))
    if kind is float:
        return float(text)
    return text


def set_value(cfg: Config, key: str, value: Any, source: str) -> None:
    """Set the field ``key`` (``section.name``) to a typed ``value``, checked against the
    field's type; a wrong type is an error naming ``source`` (a command-line option)."""
    name, _, field_name = key.partition(".")
    section = _sections(cfg)[name]
    kind = _field_types(section)[field_name]
    setattr(section, field_name, _coerce(f"{source} ({key})", value, kind))


def apply_sets(cfg: Config, assignments: list[str]) -> None:
    """Apply ``section.key=value`` strings (the ``--set`` option)."""
    sections = _sections(cfg)
    for item in assignments:
        dotted, sep, text = item.partition("=")
        name, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        if name not in sections:
            raise ConfigError(f"--set {item}: unknown section {name!r}; valid: {', '.join(sections)}")
        types = _field_types(sections[name])
        if key not in types:
            raise ConfigError(
                f"--set {item}: unknown key {name}.{key}; valid keys: " + ", ".join(types)
            )
        try:
            value = parse_value(text.strip(), types[key])
        except ValueError:
            raise ConfigError(
                f"--set {item}: {name}.{key} must be {types[key].__name__}, got {text!r}"
            ) from None
        setattr(sections[name], key, value)


# The largest config file read: a real one is a few hundred bytes.
MAX_CONFIG_BYTES = 1 << 20


def load_toml(path: str | Path, cfg: Config | None = None, given: set[str] | None = None) -> Config:
    """Read a TOML config file over the defaults (or over ``cfg``); the keys it sets
    (``"model.cell"``, ...) are added to ``given`` when one is passed."""
    path = Path(path)
    cfg = cfg or Config()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded: --config /dev/zero stops at once
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a charlm "
                "config is a few hundred bytes (see configs/ for examples)"
            )
        # utf-8-sig: Windows editors start UTF-8 files with a byte-order mark.
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply; a "
                          "charlm config has one level of [section] tables") from None
    apply_dict(cfg, data, source=str(path))
    if given is not None:
        given.update(f"{section}.{key}" for section, table in data.items()
                     if isinstance(table, dict) for key in table)
    return cfg


def _number(x: float) -> str:
    """A range bound as the user would type it: 1048576, not 1.04858e+06."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _problem(key: str, value: Any) -> str | None:
    """What is wrong with one field's value, or None."""
    if isinstance(value, str) and not _plain_text(value):
        return (f"{key} must be plain text (no control characters, line breaks or undecodable "
                f"bytes); got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} must be a finite number, got {value}"
    if key in _CHOICES and value not in _CHOICES[key]:
        return f"{key} must be one of {', '.join(_CHOICES[key])}; got {value!r}"
    if key == "model.dropout" and value >= 1.0:
        return f"model.dropout must be in [0, 1); got {value}"
    if key in _RANGES:
        low, high, low_inclusive = _RANGES[key]
        bad_low = low is not None and (value < low if low_inclusive else value <= low)
        bad_high = high is not None and value > high
        if bad_low or bad_high:
            lo = "-inf" if low is None else _number(low)
            hi = "inf" if high is None else _number(high)
            bracket = "[" if low_inclusive else "("
            return f"{key} must be in {bracket}{lo}, {hi}]; got {value!r}"
    return None


def validate(cfg: Config, sources: dict[str, str] | None = None) -> Config:
    """Check every field's range and choices; raise ConfigError naming the first bad one,
    after the command-line option it came from when ``sources`` maps its key to one."""
    for name, section in _sections(cfg).items():
        for f in fields(section):
            key = f"{name}.{f.name}"
            problem = _problem(key, getattr(section, f.name))
            if problem is not None:
                origin = (sources or {}).get(key)
                raise ConfigError(f"{origin}: {problem}" if origin else problem)
    try:  # text encodings only (not rot13, base64, zlib, ...)
        check_encoding(cfg.data.encoding)
    except DataError as exc:
        origin = (sources or {}).get("data.encoding")
        raise ConfigError(f"{origin + ': ' if origin else ''}data.encoding: {exc}") from None
    return cfg


def _plain_text(value: str) -> bool:
    """No control characters (C0, DEL, C1) and no lone surrogates (undecodable bytes of a
    command line): what a name such as an encoding or a device can hold."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF
                   for c in value)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string that reads back as ``value``: quotes, backslashes
    and control characters escaped; a lone surrogate, which TOML (UTF-8) cannot hold, as
    U+FFFD (validate refuses such values first)."""
    out = []
    for c in value:
        if c in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        elif 0xD800 <= ord(c) <= 0xDFFF:
            out.append("\\ufffd")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def to_toml(cfg: Config) -> str:
    """Render a config as TOML (only scalar fields, which is all a Config holds)."""
    lines: list[str] = []
    for name, values in cfg.to_dict().items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = toml_string(value)
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


# Fields that change the model's parameter shapes: resuming with different values is refused.
SHAPE_FIELDS = ("cell", "embed_size", "hidden_size", "num_layers")
