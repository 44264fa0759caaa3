"""Each setting is declared once (charlm.config's field metadata): every field of Config is
walked here, so a new field is checked by these tests without a new row (except a sample
value for a free-text field without choices, in SAMPLES).

For each field: the default validates; a value just outside its range, or not among its
choices, is refused naming the field (and the flag, when it came from one); it round-trips
through config.toml as charlm writes it, ``--set section.key=value`` and
``charlm.train(**overrides)``'s mapping; a field with a flag is an option of ``charlm train``
with the same help text, and ``charlm train --help`` shows it with its default."""

from __future__ import annotations

import math
import re
import tomllib

import pytest
from conftest import assert_clean_error, run_charlm, run_cli

from charlm.config import (
    BY_NAME,
    OPTIONS,
    SETTINGS,
    Config,
    apply_options,
    apply_overrides,
    apply_sets,
    load_toml,
    to_toml,
    validate,
)
from charlm.errors import ConfigError

ALL = list(SETTINGS.values())
RANGED = [s for s in ALL if s.range is not None]
CHOSEN = [s for s in ALL if s.choices is not None]
FLAGGED = [s for s in ALL if s.flag is not None]
# A value other than the default for each free-text field (no choices to pick from).
SAMPLES = {"data.encoding": "latin-1", "train.device": "cpu"}


def ids(settings):
    return [s.key for s in settings]


def get(cfg: Config, s):
    return getattr(getattr(cfg, s.section), s.name)


def put(cfg: Config, s, value) -> Config:
    setattr(getattr(cfg, s.section), s.name, value)
    return cfg


def other_value(s):
    """A valid value of ``s`` other than its default."""
    if s.kind is bool:
        return not s.default
    if s.choices is not None:
        return next(c for c in s.choices if c != s.default)
    if s.kind is str:
        assert s.key in SAMPLES, f"add a sample value of {s.key} to SAMPLES"
        return SAMPLES[s.key]
    low, high = s.range or (None, None)
    step = 1 if s.kind is int else 0.25
    for value in (s.default + step, s.default - step, (low + high) / 2 if high else None):
        if value is None:
            continue
        value = s.kind(value)
        if validate_one(s, value):
            return value
    raise AssertionError(f"no other valid value found for {s.key}")


def validate_one(s, value) -> bool:
    try:
        validate(put(Config(), s, value))
    except ConfigError:
        return False
    return True


def outside(s) -> list:
    """Values just outside the range of ``s``."""
    low, high = s.range
    values = []
    if low is not None:
        values.append(low if s.open_low else (low - 1 if s.kind is int
                                              else math.nextafter(low, -math.inf)))
    if high is not None:
        values.append(high if s.open_high else (high + 1 if s.kind is int
                                                else math.nextafter(high, math.inf)))
    return [s.kind(v) for v in values]


def inside(s) -> list:
    """The bounds of the range of ``s`` that belong to it."""
    low, high = s.range
    values = []
    if low is not None and not s.open_low:
        values.append(low)
    if high is not None and not s.open_high:
        values.append(high)
    return [s.kind(v) for v in values]


def test_the_defaults_validate():
    validate(Config())
    for s in ALL:
        assert get(Config(), s) == s.default


@pytest.mark.parametrize("s", ALL, ids=ids(ALL))
def test_every_field_is_declared_with_help(s):
    assert s.help.strip() and s.help == s.help.strip(), s.key
    assert s.kind in (int, float, str, bool)
    assert BY_NAME[s.name] is s  # charlm.train(name=...) finds it without a section


@pytest.mark.parametrize("s", RANGED, ids=ids(RANGED))
def test_a_value_just_outside_the_range_is_refused(s):
    for value in outside(s):
        with pytest.raises(ConfigError, match=rf"^{re.escape(s.key)} must be in [\[(]"):
            validate(put(Config(), s, value))
        if s.flag:  # from the command line: the flag the user typed comes first
            cfg = Config()
            sources = apply_options(cfg, {s.option: value})
            with pytest.raises(ConfigError, match=rf"^{re.escape(s.flag)}: {re.escape(s.key)} "):
                validate(cfg, sources)
    for value in inside(s):
        validate(put(Config(), s, value))


@pytest.mark.parametrize("s", CHOSEN, ids=ids(CHOSEN))
def test_a_value_not_among_the_choices_is_refused(s):
    for choice in s.choices:
        validate(put(Config(), s, choice))
    with pytest.raises(ConfigError, match=rf"^{re.escape(s.key)} must be one of "
                                          rf"{re.escape(', '.join(s.choices))}; got 'nonesuch'"):
        validate(put(Config(), s, "nonesuch"))
    if s.flag:
        cfg = Config()
        with pytest.raises(ConfigError, match=rf"^{re.escape(s.flag)}: {re.escape(s.key)} must"):
            validate(cfg, apply_options(cfg, {s.option: "nonesuch"}))


@pytest.mark.parametrize("s", ALL, ids=ids(ALL))
def test_round_trip_through_config_toml(s, tmp_path):
    cfg = put(Config(), s, other_value(s))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")  # as charlm writes a run's config.toml
    assert tomllib.loads(path.read_text("utf-8"))[s.section][s.name] == get(cfg, s)
    back = load_toml(path)
    assert back == cfg and get(back, s) != s.default


@pytest.mark.parametrize("s", ALL, ids=ids(ALL))
def test_round_trip_through_set(s):
    value = other_value(s)
    text = str(value).lower() if s.kind is bool else str(value)
    cfg = Config()
    apply_sets(cfg, [f"{s.key}={text}"])
    assert cfg == put(Config(), s, value)
    validate(cfg)


@pytest.mark.parametrize("s", ALL, ids=ids(ALL))
def test_round_trip_through_train_overrides(s):
    value = other_value(s)
    cfg = Config()
    assert apply_overrides(cfg, {s.name: value}) == {s.key}  # charlm.train(name=value)
    assert cfg == put(Config(), s, value)
    with pytest.raises(ConfigError, match=rf"^charlm.train\(\): {re.escape(s.key)} must be "):
        apply_overrides(Config(), {s.name: [value]})


@pytest.mark.parametrize("s", FLAGGED, ids=ids(FLAGGED))
def test_a_flag_sets_its_field(s):
    value = other_value(s)
    cfg = Config()
    assert apply_options(cfg, {s.option: value}) == {s.key: s.flag}
    assert cfg == put(Config(), s, value)
    # a later --set decides the value, and then no flag is named for it
    cfg = Config()
    assert apply_options(cfg, {s.option: value}, [f"{s.key}={s.default}"]) == {}
    assert cfg == Config()


def _train_command():
    import typer

    from charlm.cli.commands import app

    return typer.main.get_command(app).commands["train"]


def test_the_typed_options_of_train_are_the_flagged_fields():
    from rich.markup import escape

    params = {p.name: p for p in _train_command().params}
    for s in FLAGGED:
        p = params[s.option]
        assert s.flag in p.opts, (s.key, p.opts)
        if s.kind is bool:
            assert "--no-" + s.flag[2:] in p.secondary_opts
        assert p.help == escape(s.help), s.key
        assert p.default is None  # not given: the config file's value or the default stands
    config_options = {name for name in params if name in OPTIONS}
    assert config_options == set(OPTIONS)


@pytest.mark.parametrize("s", [s for s in FLAGGED if s.range or s.choices],
                         ids=ids([s for s in FLAGGED if s.range or s.choices]))
def test_the_command_names_the_flag_of_a_bad_value(s):
    bad = "nonesuch" if s.choices else outside(s)[0]
    proc = run_cli("train", "--dry-run", s.flag, bad)
    assert proc.returncode == 2
    assert_clean_error(proc, f"error: {s.flag}: {s.key} must be")


@pytest.fixture(scope="module")
def train_help() -> str:
    proc = run_charlm("train", "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _help_row(text: str, flag: str) -> str:
    """The row of ``flag`` in rich's option table, its wrapped lines joined."""
    rows, current = {}, None
    for line in text.splitlines():
        body = line.strip("│ \n")
        match = re.match(r"(--[a-z0-9-]+)", body)
        if match:
            current = match.group(1)
            rows[current] = body
        elif current and body and not line.startswith("╰"):
            rows[current] += " " + body
    assert flag in rows, f"{flag} is not in charlm train --help"
    return " ".join(rows[flag].split())


@pytest.mark.parametrize("s", FLAGGED, ids=ids(FLAGGED))
def test_help_shows_the_flag_and_its_default(s, train_help):
    row = _help_row(train_help, s.flag)
    shown = ("no-" + s.flag[2:] if not s.default else s.flag[2:]) if s.kind is bool \
        else s.default_text()
    assert re.search(rf"\[default: \(?{re.escape(shown)}\)?\]", row), row
    assert " ".join(s.help.split()[:4]) in row


def test_charlm_train_takes_every_field_by_name(text_file):
    """The public charlm.train(**overrides) (its dry run): every field at once, by name."""
    import charlm

    values = {s.name: other_value(s) for s in ALL if s.name != "size"}
    r = charlm.train(text_file, dry_run=True, size="fixed", **values)
    expected = Config()
    for s in ALL:
        if s.name in values:
            put(expected, s, values[s.name])
    expected.train.size = "fixed"
    assert r.config == expected
    with pytest.raises(ConfigError, match=r"^charlm.train\(\): unknown option 'seq_length'"):
        charlm.train(text_file, dry_run=True, seq_length=32)
