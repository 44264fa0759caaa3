"""Ownership of run directories (issue 30): charlm writes only into a directory that is new,
empty or a charlm run, cleans only its own temporary files, never appends to the files of a
run that was killed before its first checkpoint, and writes a config.toml that reads back.

The behaviour is the command's, so most tests run the real ``charlm`` in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, assert_clean_error, charlm_exe, run_charlm, run_cli

FIXTURE_RUN = Path(__file__).parents[1] / "fixtures" / "release-0.1.0" / "run"
TINY = ("--config", TINY_CONFIG, "--no-progress", "--precision", "fp32")
SHORT = (*TINY, "--max-steps", "2", "--eval-every", "2", "--log-every", "1")


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (names relative to it) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def steps(path: Path, kind: str = "train") -> list[int]:
    return [r["step"] for r in map(json.loads, path.read_text().splitlines())
            if r.get("kind") == kind]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------ 1. a directory charlm does not own
def test_users_config_and_metrics_are_refused_before_anything_is_written(text_file, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.toml").write_text('# my settings\n[model]\ncell = "gru"\n')
    (proj / "metrics.jsonl").write_text('{"step": 4242, "mine": true}\n')
    before = snapshot(proj)
    proc = run_charlm("train", text_file, *SHORT, "--out", proj)
    assert_clean_error(proc, "not a charlm run", "config.toml", "metrics.jsonl")
    assert proc.returncode == 1
    assert snapshot(proj) == before  # nothing overwritten, appended or added (no marker, no lock)
    assert sorted(os.listdir(proj)) == ["config.toml", "metrics.jsonl"]


@pytest.mark.parametrize("files", [
    {"config.toml": "[train]\nmax_steps = 7\n"},  # a user's partial config, no metrics
    {"metrics.jsonl": '{"step": 1}\n'},
    {"notes.txt": "my notes\n"},
    {".draft.tmp": "x\n"},  # a temporary-looking name is still the user's
    {"sub/deep.txt": "x"},
])
def test_any_foreign_file_makes_the_directory_refused(files, text_file, tmp_path):
    proj = tmp_path / "proj"
    for name, text in files.items():
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        (proj / name).write_text(text)
    before = snapshot(proj)
    proc = run_cli("train", text_file, *SHORT, "--out", proj)
    assert_clean_error(proc, "not a charlm run", next(iter(files)).split("/")[0])
    assert snapshot(proj) == before
    assert not (proj / ".charlm-run").exists() and not (proj / ".lock").exists()


def test_resuming_into_a_directory_of_user_files_is_refused(tiny_run, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.toml").write_text("[train]\nmax_steps = 7\n")
    before = snapshot(proj)
    proc = run_cli("train", "--resume", tiny_run, "--out", proj, "--max-steps", "50")
    assert_clean_error(proc, "not a charlm run", "config.toml")
    assert snapshot(proj) == before


def test_out_proc_self_names_the_real_cause(text_file):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    proc = run_charlm("train", text_file, *SHORT, "--out", "/proc/self")
    assert_clean_error(proc, "/proc/self", "not a charlm run")
    assert "another" not in proc.stderr  # not "another charlm train is already using"


def test_new_run_directory_gets_the_marker_first(text_file, tmp_path):
    run = tmp_path / "run"
    proc = run_charlm("train", text_file, *SHORT, "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert (run / ".charlm-run").read_text().startswith("charlm run directory (charlm ")
    # The default location (runs/<stem>-<cell>) is marked too.
    proc = run_charlm("train", text_file, *SHORT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "input-lstm" / ".charlm-run").is_file()


def test_planted_marker_link_is_refused(text_file, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / ".charlm-run").symlink_to(target)
    assert_clean_error(run_cli("train", text_file, *SHORT, "--out", proj), "symbolic link")
    assert target.read_text() == "keep me\n" and os.listdir(proj) == [".charlm-run"]


def test_run_of_an_older_release_without_a_marker_still_resumes(tiny_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock", ".charlm-run"))
    start = json.loads(run_charlm("info", run / "last.pt", "--json").stdout)["steps"]
    proc = run_charlm("train", "--resume", run, "--max-steps", str(start + 2), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert steps(run / "metrics.jsonl")[-1] == start + 2
    assert (run / ".charlm-run").is_file()  # taken over: marked as charlm's now


def test_stale_run_of_an_older_release_is_recognized_by_its_config(text_file, tmp_path):
    """A 0.1.0 run killed before its first checkpoint: its config.toml (exactly as that
    release wrote it) and metrics.jsonl, no marker. It is charlm's: a new run starts clean."""
    run = tmp_path / "old"
    run.mkdir()
    for name in ("config.toml", "metrics.jsonl"):
        shutil.copy(FIXTURE_RUN / name, run / name)
    old_metrics = (run / "metrics.jsonl").read_bytes()
    proc = run_cli("train", text_file, *SHORT, "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert steps(run / "metrics.jsonl") == [1, 2]
    (moved,) = run.glob("stale-*")
    assert (moved / "metrics.jsonl").read_bytes() == old_metrics


# ------------------------------------------------------------------------ 2. temporary files
def test_only_charlms_own_temporary_files_are_cleaned(text_file, tmp_path):
    run = tmp_path / "proj"
    assert run_charlm("train", text_file, *SHORT, "--out", run).returncode == 0
    dead = dead_pid()
    users = {".draft.tmp": b"x\n", f".notes.txt.{dead}.tmp": b"mine\n", "draft.tmp": b"y\n"}
    # An export writing into the run directory right now (its process is alive).
    users[f".charlm-model.onnx.{os.getpid()}.tmp"] = b"being written"
    ours = [f".charlm-last.pt.{dead}.tmp", f".charlm-metrics.jsonl.{dead}.tmp",
            f".last.pt.{dead}.tmp", f".step-00000002.pt.{dead}.tmp"]  # old releases' names
    for name, data in users.items():
        (run / name).write_bytes(data)
    for name in ours:
        (run / name).write_bytes(b"half a checkpoint")
    proc = run_charlm("train", "--resume", run, "--max-steps", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for name, data in users.items():
        assert (run / name).read_bytes() == data, name
    assert not [name for name in ours if (run / name).exists()]


def test_charlms_temporary_files_carry_its_name(tmp_path):
    from charlm.files import atomic_write

    seen = []
    atomic_write(tmp_path / "last.pt", lambda f: seen.append(Path(f.name).name))
    assert seen == [f".charlm-last.pt.{os.getpid()}.tmp"]
    assert os.listdir(tmp_path) == ["last.pt"]


# ------------------------------------------------------ 3. a run killed before its checkpoint
def test_run_killed_before_its_first_checkpoint_is_never_appended_to(text_file, tmp_path):
    run = tmp_path / "proj"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen(
        [*charlm_exe(), "train", str(text_file), *map(str, TINY), "--out", str(run),
         "--max-steps", "1000000", "--eval-every", "1000000", "--log-every", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_bytes().splitlines()) >= 3:
                break
            assert killed.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no metrics within 90 s")
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    (run / ".draft.tmp").write_text("x\n")
    stale = (run / "metrics.jsonl").read_bytes()
    stale_config = (run / "config.toml").read_bytes()
    assert max(steps(run / "metrics.jsonl")) >= 3

    proc = run_charlm("train", text_file, *SHORT, "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert steps(run / "metrics.jsonl") == [1, 2]  # the new run alone, not appended
    assert "stopped before its first checkpoint" in proc.stderr
    (moved,) = run.glob("stale-*")
    assert (moved / "metrics.jsonl").read_bytes() == stale
    assert (moved / "config.toml").read_bytes() == stale_config
    assert (run / ".draft.tmp").read_text() == "x\n"
    listed = run_charlm("runs", run, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["steps"] for r in json.loads(listed.stdout)["runs"]] == [2]


# ------------------------------------------------------------ 4. config.toml round-trips
HOSTILE = ['a"b', "a\\b", "x\ny", '"""', "'''", 'tail\\', "\\u0041", "é—中文 ☃", "\x7f",
           "\x00\x01\x1b\x1f", "\t\r\b\f", "\x85\x9f", '\\"\n"""\\', "#comment", "[model]",
           "a = 1\nb"]


def _str_fields():
    from charlm.config import Config

    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            if f.type in (str, "str"):
                yield section.name, f.name


def test_every_string_field_round_trips_through_toml(tmp_path):
    from charlm.config import Config, load_toml, to_toml

    fields = list(_str_fields())
    assert ("data", "encoding") in fields and ("train", "device") in fields
    for section, name in fields:
        for value in HOSTILE:
            cfg = Config()
            setattr(getattr(cfg, section), name, value)
            text = to_toml(cfg)
            assert tomllib.loads(text)[section][name] == value, (section, name, value)
            path = tmp_path / "config.toml"
            path.write_text(text, encoding="utf-8")
            assert load_toml(path) == cfg, (section, name, value)


@pytest.mark.parametrize("option", [
    ("--encoding", "utf\n8"), ("--encoding", "utf\x1b8"), ("--encoding", "utf\x7f8"),
    ("--encoding", "utf\x858"), ("--device", "cpu\n"), ("--set", "data.encoding=utf\t8"),
    ("--set", "train.device=c\rpu"),
])
def test_control_characters_in_a_string_option_are_refused(option, text_file, tmp_path):
    proc = run_charlm("train", text_file, *SHORT, *option, "--out", tmp_path / "run")
    assert_clean_error(proc, "plain text")
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists()


def test_hostile_but_valid_encoding_name_reads_back_from_config_toml(text_file, tmp_path):
    name = 'UTF"""\\8 é—'  # Python's codec lookup reads it as utf-8
    run = tmp_path / "run"
    proc = run_charlm("train", text_file, *SHORT, "--encoding", name, "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads((run / "config.toml").read_text("utf-8"))["data"]["encoding"] == name
    again = run_charlm("train", text_file, "--config", run / "config.toml", "--dry-run")
    assert again.returncode == 0, again.stderr
    toml = again.stdout[again.stdout.index("[model]"):again.stdout.index("[train]")]
    assert tomllib.loads(toml)["data"]["encoding"] == name


def test_python_api_refuses_a_control_character_in_a_string(text_file, tmp_path):
    import charlm
    from charlm.errors import ConfigError

    with pytest.raises(ConfigError, match="plain text"):
        charlm.train(text_file, config=TINY_CONFIG, out=tmp_path / "run", encoding="utf\n8",
                     progress=False)
    assert not (tmp_path / "run").exists()
