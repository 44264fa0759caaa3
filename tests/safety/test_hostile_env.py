"""Hostile environments (issue #15): a text that changes while it is read, a tampered or
unusable ids cache, symbolic links in a run directory, resuming into another run, odd
encodings, file names with markup, escapes or undecodable bytes, extreme in-range values, a
server that never ends, and an output stream that is full. Each ends in a correct result or
one clean ``error:`` line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, charlm_exe, run_cli
from test_hardening import TINY, clean_error, digest

import charlm.data.batching
import charlm.training.setup
from charlm.data.batching import cache_dir, load_corpus
from charlm.data.text import resolve_source
from charlm.device import cpu_count, set_threads
from charlm.errors import DataError
from charlm.sampling.sampler import pick
from charlm.storage import checkpoint
from charlm.storage import onnx as onnx_runtime

ONE_STEP = (*TINY, "--max-steps", "1", "--eval-every", "1")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """run_cli prints through the CLI's consoles, sized when they were made: make them wide,
    so that long temporary paths in tables are not cut short."""
    import charlm.cli.commands

    for console in (charlm.cli.commands.out, charlm.cli.commands.err):
        monkeypatch.setattr(console, "width", 1000)


# ------------------------------------------------------------------- 2. --resume A --out B
def test_resume_into_another_run_is_refused_and_a_fresh_directory_works(tiny_run, tmp_path):
    text = tiny_run.parent / "input.txt"
    other = tmp_path / "other"
    assert run_cli("train", text, *TINY, "--max-steps", "20", "--out", other).returncode == 0
    before = {p.name: digest(p) for p in other.iterdir() if p.is_file()}
    line = clean_error(run_cli("train", text, "--resume", tiny_run, "--out", other, *TINY,
                               "--max-steps", "41"), "holds another run", "--out")
    assert str(tiny_run) in line
    assert {p.name: digest(p) for p in other.iterdir() if p.is_file()} == before
    # What the message suggests: a fresh directory continues the run there.
    fresh = tmp_path / "fresh"
    proc = run_cli("train", text, "--resume", tiny_run, "--out", fresh, *TINY, "--max-steps", "41")
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.load(fresh / "last.pt")["train_state"]["step"] == 41


# ------------------------------------------------------------------------- 3. ids cache
def _ids(path: Path) -> np.ndarray:
    return np.array(load_corpus(path, use_cache=False).ids)


def test_text_changed_after_hashing_is_refused_and_never_cached(text_file, tmp_path, monkeypatch):
    original = resolve_source(text_file)  # hashed now, changed before it is read
    text_file.write_text(SAMPLE_TEXT.upper(), encoding="utf-8")
    with monkeypatch.context() as m:
        m.setattr(charlm.data.batching, "resolve_source", lambda path: original)
        with pytest.raises(DataError, match="changed while it was being read"):
            load_corpus(text_file)
    # Another file with the hashed content gets its own ids, not the changed text's.
    same = tmp_path / "same.txt"
    same.write_text(SAMPLE_TEXT, encoding="utf-8")
    assert np.array_equal(np.array(load_corpus(same).ids), _ids(same))


def test_text_still_being_appended_to_is_one_clean_error(text_file, monkeypatch):
    original = resolve_source(text_file)
    with open(text_file, "a", encoding="utf-8") as f:
        f.write("more text arriving\n" * 50)
    monkeypatch.setattr(charlm.data.batching, "resolve_source", lambda path: original)
    with pytest.raises(DataError, match="changed while it was being read"):
        load_corpus(text_file)


def _cache_files() -> tuple[Path, Path]:
    (bin_path,) = (cache_dir() / "ids").glob("*.bin")
    return bin_path, bin_path.with_suffix(".json")


def test_tampered_ids_cache_is_a_miss(text_file):
    want = _ids(text_file)
    load_corpus(text_file)  # writes the cache
    bin_path, meta_path = _cache_files()
    raw = bytearray(bin_path.read_bytes())
    raw[100] = (raw[100] + 1) % len(set(SAMPLE_TEXT))  # another valid id
    bin_path.write_bytes(bytes(raw))
    assert np.array_equal(np.array(load_corpus(text_file).ids), want)
    # A smaller recorded length (with a matching file) is a miss too, not a prefix.
    load_corpus(text_file)
    meta = json.loads(meta_path.read_text())
    meta["length"] -= 100
    meta_path.write_text(json.dumps(meta))
    bin_path.write_bytes(bin_path.read_bytes()[:-100])
    assert np.array_equal(np.array(load_corpus(text_file).ids), want)


def test_tampered_cache_does_not_change_eval(tiny_run, text_file):
    args = ("eval", tiny_run / "best.pt", text_file, "--device", "cpu")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    bin_path, _ = _cache_files()
    raw = bytearray(bin_path.read_bytes())
    raw[10:400] = bytes(len(raw[10:400]))  # id 0 everywhere
    bin_path.write_bytes(bytes(raw))
    assert run_cli(*args).stdout == first.stdout


# ------------------------------------------------------------------------- 4. symlinks
@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_symlink_in_a_run_directory_is_never_written_through(name, text_file, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    clean_error(run_cli("train", text_file, *ONE_STEP, "--out", run), "symbolic link", name)
    assert target.read_text() == "keep me\n"


def test_planted_temporary_file_link_is_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    # The name atomic_write gives its temporary file, planted as a link; and a link as target.
    (tmp_path / f".last.pt.{os.getpid()}.tmp").symlink_to(target)
    (tmp_path / "last.pt").symlink_to(target)
    checkpoint.atomic_write_text(tmp_path / "last.pt", "new\n")
    assert target.read_text() == "keep me\n"
    assert not (tmp_path / "last.pt").is_symlink()
    assert (tmp_path / "last.pt").read_text() == "new\n"


# ----------------------------------------------------------------- 5. unusable directories
def test_cache_directory_that_is_a_file_trains_with_a_note(text_file, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(blocker))
    proc = run_cli("train", text_file, *ONE_STEP, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "cannot be written" in proc.stderr and "in memory" in proc.stderr
    checkpoint.load(tmp_path / "run" / "last.pt")


def _can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _can_mount(), reason="needs unshare -rm (user and mount namespaces)")
def test_read_only_mount_for_cache_export_and_plot(tiny_run, text_file, tmp_path):
    """On a real read-only file system (a tmpfs mounted read-only in a private namespace)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    exe = " ".join(charlm_exe())
    script = (
        f"mount -t tmpfs -o ro none {mnt} && "
        f"{exe} export {tiny_run / 'best.pt'} -f safetensors -o {mnt / 'm.safetensors'}; "
        f"echo rc=$?; {exe} plot {tiny_run} -o {mnt / 'loss.png'}; echo rc=$?; "
        f"CHARLM_CACHE_DIR={mnt / 'cache'} {exe} train {text_file} --config {TINY_CONFIG} "
        f"--no-progress --no-samples --max-steps 1 --eval-every 1 --out {tmp_path / 'run'}; "
        "echo rc=$?"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.stdout.count("rc=1") == 2 and "rc=0" in proc.stdout, proc.stdout + proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 2 and all("Read-only file system" in x for x in errors), proc.stderr
    assert "internal error" not in proc.stderr
    assert "cannot be written (Read-only file system)" in proc.stderr


# ------------------------------------------------------------------------- 7. encodings
@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_without_a_byte_order_mark(codec, tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes(SAMPLE_TEXT.encode(codec))
    encoding = codec[:6]  # utf-16 or utf-32, as the README advises
    loaded = load_corpus(path, encoding=encoding, use_cache=False)
    assert loaded.vocab.decode(loaded.ids) == SAMPLE_TEXT
    proc = run_cli("train", path, *ONE_STEP, "--encoding", encoding, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["rot13", "base64", "zlib", "hex", "utf-8\x00", "\x00"])
def test_non_text_encodings_are_refused(name, text_file, tmp_path, tiny_run):
    proc = run_cli("train", text_file, *ONE_STEP, "--encoding", name, "--out", tmp_path / "run")
    clean_error(proc, "data.encoding")
    assert proc.returncode == 2
    clean_error(run_cli("eval", tiny_run / "best.pt", text_file, "--encoding", name), "encoding")


def test_undecodable_wide_text_is_one_line_with_a_hint(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_bytes(SAMPLE_TEXT.encode("utf-16") + b"\x00")  # an odd number of bytes
    clean_error(run_cli("train", path, *ONE_STEP, "--encoding", "utf-16"),
                "not valid utf-16", "data.errors=replace")


# ------------------------------------------------------------------------- 8. printing
def test_markup_in_a_run_directory_name_is_printed_literally(text_file, tmp_path):
    for name in ("[v2] exp", "x[/]y", "[bold red]z"):
        run = tmp_path / name
        proc = run_cli("train", text_file, *ONE_STEP, "--out", run)
        assert proc.returncode == 0, proc.stderr
        assert str(run) in proc.stderr
        if "/" not in name:  # x[/]y is the run y] in the directory x[
            assert name in run_cli("runs", tmp_path).stdout


def test_resume_hint_is_quoted_so_it_can_be_pasted(tmp_path, monkeypatch):
    run = Path("runs") / "[v2] my exp"

    def interrupted(*args, **kwargs):
        return charlm.training.setup.TrainResult(run, 3, "interrupted", 1.0, 10, 10.0, 1.0, 1.0, 1.0,
                                        100, 10, "cpu", "fp32")

    monkeypatch.setattr(charlm.training.setup, "train", interrupted)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    proc = run_cli("train", text, *TINY, "--out", tmp_path / "out")
    assert proc.returncode == 130
    assert "Resume with: charlm train --resume 'runs/[v2] my exp'" in proc.stderr


ESCAPES = "\x1b[31mred\x1b[0m\x07"


def test_escape_sequences_in_names_never_reach_the_terminal(tmp_path):
    text = tmp_path / f"{ESCAPES}.txt"
    text.write_text(SAMPLE_TEXT)
    run = tmp_path / f"run{ESCAPES}"
    outputs = [run_cli("train", text, *ONE_STEP, "--out", run)]
    assert outputs[0].returncode == 0, outputs[0].stderr
    outputs += [run_cli("runs", tmp_path), run_cli("info", run / "last.pt")]
    # The same name arriving inside a shared checkpoint.
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["train_file"]["name"] = ESCAPES
    torch.save(ckpt, tmp_path / "shared.pt")
    outputs.append(run_cli("info", tmp_path / "shared.pt"))
    for proc in outputs:
        assert proc.returncode == 0, proc.stderr
        both = proc.stdout + proc.stderr
        assert "\x1b" not in both and "\x07" not in both, both
        assert "\\x1b[31mred" in both, both


# ------------------------------------------------------------------------- 9. ranges
@pytest.mark.parametrize("seed", ["18446744073709", str(2**63 - 1)])
def test_every_documented_seed_trains(seed, text_file, tmp_path):
    proc = run_cli("train", text_file, *TINY, "--max-steps", "2", "--eval-every", "1",
                   "--seed", seed, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("options", [("-t", "1e-40"), ("-t", "5e-324"), ("--top-p", "1e-300"),
                                     ("-t", "1e-30", "--top-p", "1e-300")])
def test_tiny_temperature_and_top_p_are_greedy(options, tiny_run):
    args = ("sample", "-c", tiny_run / "best.pt", "-s", "First", "-n", "40", "--random-seed", "3")
    greedy = run_cli(*args, "-t", "0")
    proc = run_cli(*args, *options)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == greedy.stdout


def test_both_samplers_pick_the_argmax_at_tiny_temperatures():
    logits = torch.tensor([[3.0, 1.0, 2.9, -50.0], [0.0, 0.0, 0.1, 0.0]])
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for t, p in [(1e-40, 1.0), (5e-324, 1.0), (1.0, 1e-300), (1e-30, 1e-300)]:
        assert pick(logits, t, 0, p, g).tolist() == [0, 2]
        assert onnx_runtime.pick(logits.numpy(), t, 0, p, rng).tolist() == [0, 2]


def test_allocator_failure_is_the_out_of_memory_message(text_file, tmp_path, monkeypatch):
    def fail(*args, **kwargs):  # what torch's CPU allocator raises for --hidden-size 65536
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 68719476736 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(charlm.training.setup, "build_model", fail)
    proc = run_cli("train", text_file, *ONE_STEP, "--hidden-size", "65536")
    clean_error(proc, "out of memory", "64.0 GiB", "smaller model")


def test_bad_dist_timeout_under_torchrun_is_printed_once(text_file, tmp_path):
    from test_distributed import torchrun

    for value in ("-5", "nan", "inf"):
        proc = torchrun("train", text_file, "--dist-timeout", value, env={}, cwd=tmp_path)
        assert proc.returncode != 0
        assert proc.stderr.count("--dist-timeout must be") == 1, proc.stderr


# ------------------------------------------------------------------------- 11. full output
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["sample", "info", "runs"])
def test_full_output_stream_is_one_line(command, tiny_run):
    args = {"sample": ("sample", "-c", tiny_run / "best.pt", "-n", "2000"),
            "info": ("info", tiny_run / "best.pt"), "runs": ("runs", tiny_run.parent)}[command]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*charlm_exe(), *map(str, args)], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    proc.stdout = ""
    clean_error(proc, "cannot write the output", "No space left on device")
    assert proc.stderr.count("\n") == 1, proc.stderr


# ------------------------------------------------------------------- 12. non-UTF-8 names
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file names are always UTF-8")
def test_names_with_undecodable_bytes_export_and_sample(tiny_run, tmp_path):
    src = tmp_path / os.fsdecode(b"mod\xffel.pt")
    shutil.copy(tiny_run / "best.pt", src)
    greedy = run_cli("sample", "-c", src, "-t", "0", "-n", "30", "-s", "First")
    assert greedy.returncode == 0, greedy.stderr
    for fmt in ("safetensors", "onnx"):
        proc = run_cli("export", src, "-f", fmt)
        assert proc.returncode == 0, proc.stderr
        assert "mod\\udcffel" in proc.stdout  # shown escaped, not as a broken character
        out = src.with_suffix(f".{fmt}")
        again = run_cli("sample", "-c", out, "-t", "0", "-n", "30", "-s", "First")
        assert again.stdout == greedy.stdout, again.stderr
        if fmt == "safetensors":
            assert run_cli("info", out).returncode == 0
    text = tmp_path / os.fsdecode(b"text-\xfe.txt")
    text.write_text(SAMPLE_TEXT)
    proc = run_cli("train", text, *ONE_STEP, "--out", tmp_path / os.fsdecode(b"run-\xfd"))
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------- questionable
def test_toml_config_with_a_utf8_byte_order_mark(text_file, tmp_path):
    config = tmp_path / "bom.toml"
    config.write_bytes(b"\xef\xbb\xbf" + TINY_CONFIG.read_bytes())
    proc = run_cli("train", text_file, "--config", config, "--no-progress", "--no-samples",
                   "--max-steps", "1", "--eval-every", "1", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr


def test_threads_are_capped_at_the_cores_available():
    before = torch.get_num_threads()
    try:
        assert set_threads(1024) == cpu_count() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_stale_export_temporaries_are_removed(tiny_run, tmp_path):
    src = tmp_path / "m.pt"
    shutil.copy(tiny_run / "best.pt", src)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".m.safetensors.{dead}.tmp"
    stale.write_bytes(b"half an export")
    assert run_cli("export", src, "-f", "safetensors").returncode == 0
    assert not stale.exists()


def test_resume_with_another_val_fraction_says_so(tiny_run, tmp_path):
    proc = run_cli("train", tiny_run.parent / "input.txt", "--resume", tiny_run, "--out",
                   tmp_path / "run", *TINY, "--max-steps", "41", "--set", "data.val_fraction=0.2")
    assert proc.returncode == 0, proc.stderr
    assert "data.val_fraction changed (0.1 -> 0.2)" in proc.stderr

