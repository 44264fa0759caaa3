"""Config: TOML overrides, --set, errors that name the valid keys, ranges, TOML round trip."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import (
    CELLS,
    Config,
    ModelConfig,
    TrainConfig,
    apply_sets,
    load_toml,
    parse_value,
    to_toml,
    validate,
)
from charlm.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_overrides_only_what_it_names(tmp_path):
    path = write(tmp_path, '[model]\ncell = "gru"\nhidden_size = 64\n[train]\nlr = 1\n')
    cfg = load_toml(path)
    assert cfg.model.cell == "gru" and cfg.model.hidden_size == 64
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted for float
    assert cfg.model.embed_size == ModelConfig().embed_size
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_toml_over_a_given_config(tmp_path):
    base = Config()
    base.train.max_steps = 7
    cfg = load_toml(write(tmp_path, "[train]\nseq_len = 9\n"), base)
    assert cfg.train.max_steps == 7 and cfg.train.seq_len == 9


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    validate(load_toml(path))


def test_unknown_key_names_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_toml(write(tmp_path, "[model]\nhiden_size = 3\n"))
    message = str(info.value)
    assert "unknown key model.hiden_size" in message
    for key in ("cell", "embed_size", "hidden_size", "num_layers", "dropout"):
        assert key in message


def test_unknown_section_names_valid_sections(tmp_path):
    needle = r"unknown section \[optim\]; valid sections: model, data, train"
    with pytest.raises(ConfigError, match=needle):
        load_toml(write(tmp_path, "[optim]\nlr = 1.0\n"))
    with pytest.raises(ConfigError, match=r"\[model\] must be a table"):
        load_toml(write(tmp_path, "model = 3\n"))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[model]\nhidden_size = "big"', "model.hidden_size must be int, got str 'big'"),
        ("[model]\nhidden_size = 1.5", "model.hidden_size must be int, got float 1.5"),
        ("[train]\nmax_steps = true", "train.max_steps must be int, got bool True"),
        ('[train]\nlr = "fast"', "train.lr must be float, got str"),
        ("[model]\ncell = 3", "model.cell must be str, got int 3"),
    ],
)
def test_wrong_type(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_toml(write(tmp_path, text + "\n"))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(write(tmp_path, "[model\ncell = 1\n"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_toml(tmp_path)


def test_set_parsing():
    cfg = Config()
    apply_sets(cfg, ["train.lr=0.01", " model.cell = gru", "train.max_steps=1_000",
                     "data.encoding=latin-1", "train.max_time=2", "data.encoding=a=b"])
    assert cfg.train.lr == 0.01 and cfg.model.cell == "gru"
    assert cfg.train.max_steps == 1000 and cfg.train.max_time == 2.0
    assert cfg.data.encoding == "a=b"  # only the first '=' separates key and value


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("lr=0.1", "expects section.key=value"),
        ("train.lr", "expects section.key=value"),
        ("optim.lr=1", "unknown section 'optim'; valid: model, data, train"),
        ("train.learning_rate=1", "unknown key train.learning_rate; valid keys: batch_size"),
        ("train.max_steps=ten", "train.max_steps must be int, got 'ten'"),
        ("train.lr=fast", "train.lr must be float"),
    ],
)
def test_set_errors(item, needle):
    with pytest.raises(ConfigError) as info:
        apply_sets(Config(), [item])
    assert needle in str(info.value)


def test_parse_value_bool():
    assert parse_value("Yes", bool) is True and parse_value("off", bool) is False
    with pytest.raises(ValueError):
        parse_value("maybe", bool)


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("model.cell=transformer", "model.cell must be one of rnn, lstm, gru"),
        ("model.dropout=1", "model.dropout must be in [0, 1)"),
        ("model.dropout=-0.1", "model.dropout must be in [0, 1]"),
        ("model.hidden_size=0", "model.hidden_size must be in [1, 65536]"),
        ("data.val_fraction=0", "data.val_fraction must be in (0, 0.9]"),
        ("data.val_fraction=0.95", "data.val_fraction must be in (0, 0.9]"),
        ("train.batch_size=0", "train.batch_size must be in [1,"),
        ("train.lr=0", "train.lr must be in (0, 10]"),
        ("train.lr=nan", "train.lr must be a finite number"),
        ("train.max_time=inf", "train.max_time must be a finite number"),
        ("train.max_steps=-1", "train.max_steps must be in [0, inf]"),
        ("data.errors=ignore", "data.errors must be one of strict, replace"),
        ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16, fp16"),
    ],
)
def test_validate_ranges(item, needle):
    cfg = Config()
    apply_sets(cfg, [item])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert needle in str(info.value)


def test_defaults_are_valid():
    validate(Config())


FLOATS = st.floats(min_value=0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    cell=st.sampled_from(CELLS),
    hidden_size=st.integers(1, 10**6),
    lr=FLOATS,
    dropout=FLOATS,
    encoding=st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=20),
    seed=st.integers(0, 2**63 - 1),
)
def test_to_toml_round_trip(cell, hidden_size, lr, dropout, encoding, seed):
    cfg = Config()
    cfg.model.cell, cfg.model.hidden_size, cfg.model.dropout = cell, hidden_size, dropout
    cfg.train.lr, cfg.train.seed, cfg.data.encoding = lr, seed, encoding
    text = to_toml(cfg)
    assert tomllib.loads(text) == cfg.to_dict()
    assert Config.from_dict(tomllib.loads(text)) == cfg


def test_to_toml_quotes_and_backslashes():
    cfg = Config()
    cfg.data.encoding = 'we"ird\\name'
    assert tomllib.loads(to_toml(cfg))["data"]["encoding"] == 'we"ird\\name'


def test_every_field_has_a_default_of_its_type():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            value = getattr(section.default_factory(), f.name)
            assert type(value).__name__ == f.type, f"{section.name}.{f.name}"
