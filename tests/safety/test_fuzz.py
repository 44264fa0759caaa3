"""Fuzzing the real ``charlm`` command: random byte files and random option values, in range,
out of range and of the wrong type. Every run must end with exit code 0 or one clean
``error:`` line (never a traceback, never the last-resort "internal error"), within a time
limit, and leave no temporary files behind.

Each example starts a process that imports torch, so the example counts are small; valid
values are kept tiny (a few steps of a model with a handful of units), so that a run that
succeeds is as quick as one that fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, assert_clean_error, run_charlm, run_cli
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from charlm.storage import checkpoint

FUZZ = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Strings that are not what a number option expects, but look close.
JUNK = st.sampled_from(["", "abc", "1e3", "-0", "nan", "inf", "-inf", "0x10", "1_000", " 3",
                        "3.5", "１２", "--", "=", "None", "true", "1e-400", "9" * 30])
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=12)


def _number(text: str) -> float | None:
    try:
        return float(text.strip().replace("_", ""))
    except ValueError:
        return None


def values(*valid, slow_above: float | None = None) -> st.SearchStrategy[str]:
    """A valid value, a random number, junk or random text, as a string. Numbers above
    ``slow_above`` are left out: they may be valid and then cost minutes or gigabytes."""
    good = st.sampled_from([str(v) for v in valid])
    drawn = st.one_of(
        good, good, good, good,  # about half the draws: a run that gets past the options
        st.integers(-10**6, 10**6).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        JUNK,
        ARG_TEXT,
    )
    if slow_above is None:
        return drawn
    return drawn.filter(lambda v: not (_number(v) or 0) > slow_above)


# Named train options: the valid values are tiny. --max-steps is never 0 (no limit).
TRAIN_OPTIONS = {
    "--batch-size": values(1, 2, 4), "--seq-len": values(1, 4, 8),
    "--hidden-size": values(1, 4, 8, slow_above=64), "--embed-size": values(1, 4, slow_above=64),
    "--num-layers": values(1, 2, slow_above=8), "--dropout": values(0, 0.2, 0.5),
    "--lr": values(0.001, 0.01, 1),
    "--max-steps": st.sampled_from(["1", "2", "3", "-1", "abc", "1.5", "", "nan", "1e9"]),
    "--eval-every": values(1, 2), "--seed": values(0, 7), "--cell": st.sampled_from(
        ["rnn", "lstm", "gru", "LSTM", "transformer", ""]),
    "--patience": values(0, 1), "--keep-last": values(0, 1), "--max-epochs": values(0, 0.5),
    "--encoding": st.sampled_from(["utf-8", "latin-1", "utf-16", "utf-32-be", "ascii", "klingon",
                                   "", "rot13", "base64", "zlib"]),
    "--precision": st.sampled_from(["auto", "fp32", "bf16", "fp16", "fp8"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda", "cuda:9", "tpu", ""]),
}
# --set keys whose every small value is cheap (train.max_steps=0 would mean no limit).
SET_KEYS = ["model.cell", "model.hidden_size", "model.dropout", "data.val_fraction",
            "data.errors", "train.lr", "train.grad_clip", "train.warmup_steps",
            "train.weight_decay", "train.on_nan", "train.log_every", "train.seed",
            "train.min_lr_ratio", "train.eval_seq_len", "train.patience", "model.bogus",
            "nosuch.key", "train", ""]
SET_VALUES = st.one_of(st.integers(0, 3).map(str), st.sampled_from(["0.5", "skip", "replace"]),
                       JUNK, ARG_TEXT)


@st.composite
def corrupted_text(draw) -> bytes:
    """The sample corpus with random damage: bytes spliced in, a BOM, CRLF, truncation."""
    raw = SAMPLE_TEXT.encode()
    if draw(st.booleans()):
        raw = raw.replace(b"\n", b"\r\n")
    cut = draw(st.integers(0, len(raw)))
    raw = raw[:cut] + draw(st.binary(max_size=64)) + raw[cut:]
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + raw


FILES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass")),
    corrupted_text(),
)


def check(proc, out: Path | None = None) -> None:
    note(f"exit {proc.returncode}; stderr: {proc.stderr[-600:]}")
    assert "Traceback" not in proc.stdout + proc.stderr
    if proc.returncode != 0:
        assert_clean_error(proc)
        assert "internal error" not in proc.stderr
    if out is not None and out.exists():
        assert not list(out.glob(".*.tmp"))
        if proc.returncode == 0:
            checkpoint.load(out / "last.pt")


@FUZZ
@given(content=FILES,
       options=st.dictionaries(st.sampled_from(sorted(TRAIN_OPTIONS)), st.just(None),
                               max_size=4).flatmap(
           lambda d: st.fixed_dictionaries({k: TRAIN_OPTIONS[k] for k in d})),
       sets=st.lists(st.tuples(st.sampled_from(SET_KEYS), SET_VALUES), max_size=2))
def test_fuzz_train(content, options, sets):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.txt"
        path.write_bytes(content)
        out = Path(tmp) / "run"
        args = ["train", path, "--out", out, "--no-progress", "--embed-size", "4",
                "--hidden-size", "8", "--batch-size", "2", "--seq-len", "8", "--max-steps", "2",
                "--eval-every", "2", "--set", "train.threads=1", "--set", "train.sample_chars=8",
                "--set", "train.eval_streams=2", "--set", "train.eval_seq_len=16"]
        for name, value in options.items():
            args += [name, value]
        for key, value in sets:
            args += ["--set", f"{key}={value}" if key else value]
        note(f"argv: {args[1:]}")
        check(run_charlm(*args, timeout=90), out)


@FUZZ
@given(options=st.fixed_dictionaries({}, optional={
    "--length": values(0, 1, 20, slow_above=200), "--temperature": values(0, 0.5, 1, 2),
    "--top-k": values(0, 1, 5), "--top-p": values(0.1, 0.9, 1),
    "--num-samples": values(1, 2, 3, slow_above=16), "--random-seed": values(0, 1, 2**40),
    "--device": st.sampled_from(["cpu", "cuda", "meta", ""]),
}), seed=st.one_of(ARG_TEXT, st.sampled_from(["First", "", "\n", "Zebra €", "一"])),
    drop=st.booleans())
def test_fuzz_sample(tiny_run, options, seed, drop):
    args = ["sample", "-c", tiny_run / "best.pt", "--seed", seed, "-n", "10"]
    for name, value in options.items():
        args += [name, value]
    if drop:
        args.append("--drop-unknown")
    note(f"argv: {args[1:]}")
    proc = run_charlm(*args, timeout=60)
    check(proc)
    if proc.returncode == 0:
        assert proc.stdout  # at least the newline


# ----------------------------------------------------------------- crafted files (issue #15)
# Optimizer-state entries of every kind: right or wrong shapes, dtypes, broadcast and
# transposed views, odd steps. Resuming must train on a fresh copy or refuse in one line;
# before the checks some of these corrupted the heap, so they run in a separate process.
MOMENT_SHAPES = st.sampled_from([(128, 32), (32, 128), (128,), (1,), (0,), (128, 32, 1), ()])
MOMENT_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64,
                                 torch.uint8, torch.bool, torch.complex64])


@st.composite
def moments(draw):
    shape = draw(MOMENT_SHAPES)
    kind = draw(st.sampled_from(["dense", "broadcast", "transposed", "strided", "list"]))
    dtype = draw(MOMENT_DTYPES)
    if kind == "list":
        return [0.0] * 4
    if kind == "broadcast" and shape:
        return torch.zeros(1, dtype=dtype).expand(*shape)
    if kind == "transposed" and len(shape) == 2:
        return torch.zeros(shape[::-1], dtype=dtype).t()
    if kind == "strided" and shape:
        return torch.zeros(shape[0] * 2, *shape[1:], dtype=dtype)[::2]
    return torch.zeros(shape, dtype=dtype)


STEPS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(torch.tensor),
                  st.integers(-5, 2**70).map(lambda i: i if i < 2**63 else float(i)),
                  st.just(torch.zeros(3)), st.just("40"), st.none())


@st.composite
def optimizer_crafts(draw):
    index = draw(st.integers(0, 6))
    key = draw(st.sampled_from(["exp_avg", "exp_avg_sq", "step"]))
    value = draw(STEPS) if key == "step" else draw(moments())
    shown = (value.shape, value.dtype, value.stride()) if isinstance(value, torch.Tensor) else value
    note(f"state[{index}][{key!r}] = {shown}")
    return lambda c: c["optimizer"]["state"][index].__setitem__(key, value)


@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(crafts=st.lists(optimizer_crafts(), min_size=6, max_size=6))
def test_fuzz_crafted_optimizer_states(tiny_run, crafts):
    from test_hostile_files import resume_crafted

    with tempfile.TemporaryDirectory() as tmp:
        for code, stderr in resume_crafted(tiny_run, Path(tmp), crafts):
            check(subprocess.CompletedProcess([], code, "", stderr))


# Configs inside each file format: any key of any section set to values of any type.
CONFIG_VALUES = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
                          st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
                          st.sampled_from([0, 1, 64, 65, 12_000, 100_000, -1, 5, 0.5]))
CONFIG_EDITS = st.lists(st.tuples(st.sampled_from(["model", "data", "train", "bogus"]),
                                  st.sampled_from(["cell", "embed_size", "hidden_size",
                                                   "num_layers", "dropout", "encoding",
                                                   "seed", "bogus"]),
                                  CONFIG_VALUES), min_size=1, max_size=3)


def _edited(config: dict, edits) -> dict:
    config = json.loads(json.dumps(config))
    for section, key, value in edits:
        config.setdefault(section, {})[key] = value
    return config


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=CONFIG_EDITS, fmt=st.sampled_from(["pt", "safetensors", "onnx"]))
def test_fuzz_configs_inside_files(tiny_run, exports, edits, fmt):
    from test_hostile_files import _metadata, _rewrite

    note(f"{fmt}: {edits}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"crafted.{fmt}"
        if fmt == "pt":
            ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
            ckpt["config"] = _edited(ckpt["config"], edits)
            torch.save(ckpt, path)
        else:
            meta = _metadata(exports[fmt])
            config = _edited(json.loads(meta["config"]), edits)
            _rewrite(exports[fmt], path, {**meta, "config": json.dumps(config)})
        for args in (("sample", "-c", path, "-n", "3"), ("info", path)):
            if fmt == "onnx" and args[0] == "info":
                continue
            start = time.perf_counter()
            check(run_cli(*args))
            assert time.perf_counter() - start < 10, args


# File names of every kind: markup, terminal escapes, newlines, undecodable bytes.
NAME_PARTS = st.sampled_from(["[v2] ", "[/]", "[bold]", "\x1b[31m", "\x07", "\n", "\t", "'",
                              '"', "$(x)", " ", "é", "一", os.fsdecode(b"\xff"), "-", "a"])
NAMES = st.lists(NAME_PARTS, min_size=1, max_size=5).map("".join).filter(
    lambda n: n.strip(" -") and n not in (".", ".."))


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text_name=NAMES, run_name=NAMES)
def test_fuzz_hostile_file_names(text_name, run_name):
    note(f"text {text_name!r}, run {run_name!r}")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / f"{text_name}.txt"  # a "/" in the name makes a folder
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(SAMPLE_TEXT)
        run = Path(tmp) / "runs" / run_name
        outputs = [run_cli("train", text, "--config", TINY_CONFIG, "--no-progress",
                           "--no-samples", "--max-steps", "1", "--eval-every", "1",
                           "--set", "train.threads=1", "--out", run)]
        if outputs[0].returncode == 0:
            outputs += [run_cli("info", run / "last.pt"), run_cli("runs", Path(tmp) / "runs"),
                        run_cli("sample", "-c", run / "last.pt", "-n", "5")]
        for proc in outputs:
            check(proc)
            shown = proc.stderr + (proc.stdout if proc.args[0] != "sample" else "")
            assert not any(c in shown for c in "\x1b\x07"), shown
