"""Typed configuration: one source of defaults, overridden by TOML files and the command line.

A run's config has three sections, ``model``, ``data`` and ``train``. Files in ``configs/``
and ``--set section.key=value`` options only override fields that exist; an unknown key, a
wrong type or a value out of range is a :class:`ConfigError` naming the valid choices.

Each field is declared once, in its ``field(metadata=setting(...))``: default, help text,
range or choices and, for the typed options of ``charlm train``, its flag. Validation and its
messages, TOML, ``--set``, ``charlm.train(**overrides)`` (:func:`apply_overrides`) and the
command's options and ``--help`` (charlm.cli.options) are all read from :data:`SETTINGS`.
Adding a setting is one field here; tests/test_settings.py walks every field.

Over 300 lines: one concept, the fields with their defaults and ranges, and their reading
from files and options, which read best side by side.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from charlm.data.text import NEWLINES, check_encoding
from charlm.errors import CharlmError, ConfigError
from charlm.model.cells import CHOICES_TEXT as CELLS_TEXT
from charlm.model.cells import NAMES as CELLS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Setting:
    """What one config field is, declared once in its ``field(metadata=setting(...))``:
    everything else (validation and its messages, TOML, ``--set``, ``charlm.train(**overrides)``,
    the typed options of ``charlm train`` and their ``--help``) reads it from here."""

    section: str
    name: str
    kind: type
    default: Any
    help: str
    # (low, high); None is unbounded. open_low: low itself is refused; open_high: high is.
    range: tuple[float | None, float | None] | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    # The option of ``charlm train`` that sets it (a bool gets --flag/--no-flag), or None.
    flag: str | None = None
    # A further check of the value: raises CharlmError with what is wrong.
    check: Callable[[Any], Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def option(self) -> str | None:
        """The option's parameter name (``--random-seed``: ``random_seed``)."""
        return self.flag[2:].replace("-", "_") if self.flag else None

    def default_text(self) -> str:
        """The default as ``--help`` shows it: 0.003, not 0.0030000000000000001."""
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


def setting(help: str, *, range: tuple[float | None, float | None] | None = None,
            open_low: bool = False, open_high: bool = False,
            choices: tuple[str, ...] | None = None, flag: str | None = None,
            check: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """A config field's metadata: its help text, range or choices and command-line flag."""
    return {"charlm": dict(help=help, range=range, open_low=open_low, open_high=open_high,
                           choices=choices, flag=flag, check=check)}


def _field(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata=setting(help, **meta))


_BIG = 1 << 20  # 1048576: windows, batches and sample lengths
_SEED_MAX = 2**63 - 1


@dataclass
class ModelConfig:
    cell: str = _field("lstm", f"{CELLS_TEXT}: the recurrent cell.", choices=CELLS, flag="--cell")
    embed_size: int = _field(128, "Size of each character's embedding vector.",
                             range=(1, 65536), flag="--embed-size")
    hidden_size: int = _field(256, "Units in each recurrent layer.", range=(1, 65536),
                              flag="--hidden-size")
    num_layers: int = _field(1, "Stacked recurrent layers.", range=(1, 64), flag="--num-layers")
    dropout: float = _field(0.0, "Dropout probability on the embeddings, between layers and "
                            "before the output layer, in [0, 1).", range=(0.0, 1.0),
                            open_high=True, flag="--dropout")


@dataclass
class DataConfig:
    val_fraction: float = _field(0.1, "Share of the text held out for validation.",
                                 range=(0.0, 0.9), open_low=True)
    encoding: str = _field("utf-8", "Text encoding of FILE.", check=check_encoding,
                           flag="--encoding")
    errors: str = _field("strict", "strict refuses undecodable bytes; replace maps them to U+FFFD.",
                         choices=("strict", "replace"))
    newline: str = _field("normalize", "normalize reads CRLF and CR line endings as \\n (as "
                          "Python's text mode); keep leaves them.", choices=NEWLINES)


@dataclass
class TrainConfig:
    batch_size: int = _field(64, "Streams per process.", range=(1, _BIG), flag="--batch-size")
    seq_len: int = _field(64, "Window length (BPTT steps).", range=(1, _BIG), flag="--seq-len")
    lr: float = _field(3e-3, "Peak learning rate.", range=(0.0, 10.0), open_low=True, flag="--lr")
    min_lr_ratio: float = _field(0.1, "Cosine decay ends at lr * min_lr_ratio.", range=(0.0, 1.0))
    warmup_steps: int = _field(100, "Steps of linear learning-rate warmup.", range=(0, None))
    weight_decay: float = _field(0.01, "AdamW weight decay.", range=(0.0, 10.0))
    grad_clip: float = _field(1.0, "Clip the gradient norm to this (0: no clipping).",
                              range=(0.0, None))
    # Limits: training stops at whichever comes first; 0 means no limit.
    max_steps: int = _field(2000, "Stop after this many steps (0: no limit).", range=(0, None),
                            flag="--max-steps")
    max_time: float = _field(0.0, "Stop so that the whole run, final evaluation included, takes "
                             "this many seconds (0: no limit).", range=(0.0, None),
                             flag="--max-time")
    max_epochs: float = _field(0.0, "Stop after this many epochs (0: no limit).", range=(0.0, None),
                               flag="--max-epochs")
    # "auto" sizes with charlm.training.sizing. The front ends (charlm train, charlm.train())
    # make it "auto" unless it or a shape field is given; a Config built in Python trains its
    # own shape.
    size: str = _field("fixed", "auto: with a time budget and no shape option, choose the model, "
                       "batch, window, lr and dropout for the budget on this device; fixed: train "
                       "the configured shape.", choices=("auto", "fixed"), flag="--size")
    # 0 paces evaluation and logging to the run's limits (charlm.training.pacing).
    eval_every: int = _field(0, "Evaluate every N steps (0: about 12 times over the run's limit).",
                             range=(0, None), flag="--eval-every")
    log_every: int = _field(0, "Log the training loss every N steps (0: about 50 times over the "
                            "run's limit).", range=(0, None), flag="--log-every")
    seed: int = _field(1337, "Random seed (initial weights, data order, dropout, samples).",
                       range=(0, _SEED_MAX), flag="--random-seed")
    device: str = _field("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.",
                         flag="--device")
    precision: str = _field("auto", "auto, fp32, bf16 or fp16.", choices=PRECISIONS,
                            flag="--precision")
    threads: int = _field(0, "CPU threads for torch (0: the physical cores available).",
                          range=(0, 1024))
    # 64 streams evaluate 1.4x faster than 32 (bf16, Zen 4) for +0.0014 nats of cold starts.
    eval_streams: int = _field(64, "Parallel streams over the validation split.",
                               range=(1, 1 << 16))
    eval_seq_len: int = _field(256, "Window length of evaluation.", range=(1, _BIG))
    sample_chars: int = _field(200, "Characters of each sample printed at an evaluation (0: none).",
                               range=(0, _BIG))
    sample_every: int = _field(0, "Print a sample every N steps (at evaluations; 0: at every "
                               "evaluation).", range=(0, None), flag="--sample-every")
    patience: int = _field(0, "Stop after K evaluations without a new best (0: never).",
                           range=(0, None), flag="--patience")
    keep_last: int = _field(0, "Also keep the last K step checkpoints.", range=(0, None),
                            flag="--keep-last")
    on_nan: str = _field("stop", "On a NaN/inf loss: stop keeps the last good checkpoint; skip "
                         "drops the step and goes on.", choices=("stop", "skip"))
    tensorboard: bool = _field(False, 'Also write TensorBoard logs into the run directory (pip '
                               'install "charlm[tensorboard]").', flag="--tensorboard")


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


def _collect() -> dict[str, Setting]:
    types = {"int": int, "float": float, "str": str, "bool": bool}
    found: dict[str, Setting] = {}
    for part in fields(Config):
        for f in fields(part.default_factory):
            kind = types[f.type] if isinstance(f.type, str) else f.type
            meta = f.metadata.get("charlm")
            if meta is None:
                raise TypeError(f"config field {part.name}.{f.name} has no setting(...) metadata")
            s = Setting(part.name, f.name, kind, f.default, **meta)
            found[s.key] = s
    return found


# Every config field, by key ("train.seq_len"), in the order of the sections and fields.
SETTINGS: dict[str, Setting] = _collect()
# charlm.train(**overrides) names a field without its section, so field names are unique.
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS.values()}
# The typed options of charlm train, by parameter name ("random_seed" sets train.seed).
OPTIONS: dict[str, Setting] = {s.option: s for s in SETTINGS.values() if s.option}
if len(BY_NAME) != len(SETTINGS):
    raise TypeError("two config sections have a field of the same name")


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


def _field_types(section: str) -> dict[str, type]:
    return {s.name: s.kind for s in SETTINGS.values() if s.section == section}


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
        types = _field_types(name)
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
    kind = _field_types(name)[field_name]
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
        types = _field_types(name)
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


def apply_options(cfg: Config, options: dict[str, Any], sets: list[str] = ()) -> dict[str, str]:
    """Set the typed options of ``charlm train`` on ``cfg``, keyed by parameter name
    (``{"seq_len": 64}`` sets ``cfg.train.seq_len``; None: not given), then the ``--set``
    strings over them. Returns {config key: flag} for the fields an option set, so that a
    value out of range is reported with the flag the user typed (``validate(cfg, sources)``)."""
    sources = {}
    for option, value in options.items():
        if value is None:
            continue
        s = OPTIONS[option]
        set_value(cfg, s.key, value, s.flag)
        sources[s.key] = s.flag
    apply_sets(cfg, list(sets))
    for item in sets:  # a later --set decides the value
        sources.pop(item.partition("=")[0].strip(), None)
    return sources


def apply_overrides(cfg: Config, overrides: dict[str, Any],
                    source: str = "charlm.train()") -> set[str]:
    """Set fields by name without their section (``charlm.train(hidden_size=128)``);
    returns the keys set (``{"model.hidden_size"}``)."""
    for name, value in overrides.items():
        if name not in BY_NAME:
            raise ConfigError(f"{source}: unknown option {name!r}; valid options: "
                              + ", ".join(BY_NAME))
        s = BY_NAME[name]
        apply_dict(cfg, {s.section: {name: value}}, source=source)
    return {BY_NAME[name].key for name in overrides}


def layered(path: str | Path | None, options: dict[str, Any], sets: list[str] = ()) -> Config:
    """A command's config: the TOML file at ``path`` (or the defaults), the typed options over
    it, then the ``--set`` strings; validated, a bad value named by the option that set it."""
    cfg = load_toml(path) if path is not None else Config()
    return validate(cfg, apply_options(cfg, options, sets))


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
    """What is wrong with one field's value against its setting, or None."""
    s = SETTINGS[key]
    if isinstance(value, str) and not _plain_text(value):
        return (f"{key} must be plain text (no control characters, line breaks or undecodable "
                f"bytes); got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} must be a finite number, got {value}"
    if s.choices is not None and value not in s.choices:
        return f"{key} must be one of {', '.join(s.choices)}; got {value!r}"
    if s.range is None:
        return None
    low, high = s.range
    lo = "-inf" if low is None else _number(low)
    hi = "inf" if high is None else _number(high)
    bracket = "(" if s.open_low else "["
    if s.open_high and high is not None and value >= high:
        return f"{key} must be in {bracket}{lo}, {hi}); got {value}"
    if (low is not None and (value <= low if s.open_low else value < low)
            or high is not None and value > high):
        return f"{key} must be in {bracket}{lo}, {hi}]; got {value!r}"
    return None


def validate(cfg: Config, sources: dict[str, str] | None = None) -> Config:
    """Check every field's range and choices, then the further checks of the fields that
    have one (text encodings only: not rot13, base64, zlib, ...); raise ConfigError naming
    the first bad one, after the command-line option it came from when ``sources`` maps its
    key to one."""
    sections = _sections(cfg)
    for key, s in SETTINGS.items():
        problem = _problem(key, getattr(sections[s.section], s.name))
        if problem is not None:
            origin = (sources or {}).get(key)
            raise ConfigError(f"{origin}: {problem}" if origin else problem)
    for key, s in SETTINGS.items():
        if s.check is None:
            continue
        try:
            s.check(getattr(sections[s.section], s.name))
        except CharlmError as exc:
            origin = (sources or {}).get(key)
            raise ConfigError(f"{origin + ': ' if origin else ''}{key}: {exc}") from None
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
