"""Checkpoints: what they record, atomic writes under SIGKILL, refusal of crafted pickles,
and one-line errors for every kind of bad file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_charlm, run_cli

import charlm
from charlm.config import Config, ModelConfig
from charlm.data.vocab import Vocab
from charlm.errors import CheckpointError
from charlm.model.network import build_model
from charlm.runs.directory import RunLock
from charlm.storage import checkpoint


def assert_plain_data(value, where="checkpoint") -> None:
    """Only tensors and plain Python values: what weights_only=True may load."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str | int), f"{where}: key {key!r}"
            assert_plain_data(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            assert_plain_data(item, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, torch.Tensor | str | int | float | bool), (
            f"{where} is a {type(value).__name__}"
        )


# ------------------------------------------------------------------------ what is recorded
def test_checkpoint_records_versions_source_and_time(tiny_run):
    ckpt = checkpoint.load(tiny_run / "last.pt")
    text = tiny_run.parent / "input.txt"
    assert ckpt["format"] == checkpoint.FORMAT
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION
    assert ckpt["charlm_version"] == charlm.__version__
    assert ckpt["torch_version"] == str(torch.__version__)
    source = ckpt["train_file"]
    assert source["name"] == "input.txt"
    assert source["size"] == text.stat().st_size
    assert source["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert Path(source["path"]) == text.resolve()
    ts = ckpt["train_state"]
    assert ts["step"] == 40
    assert isinstance(ts["elapsed"], float) and 0 < ts["elapsed"] < 600
    assert_plain_data(ckpt)

    proc = run_cli("info", tiny_run / "last.pt")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in proc.stdout.splitlines() if line.count("│") >= 3}
    assert rows["steps"] == "40"
    assert rows["training time"] == f"{ts['elapsed']:,.1f} s"
    assert rows["training file"].startswith("input.txt")


def test_checkpoint_tensors_are_cpu_fp32_and_load_on_cpu(tmp_path):
    """GPU and bf16 weights are stored as CPU fp32, so any machine can load them."""
    cfg = Config(model=ModelConfig(cell="gru", embed_size=4, hidden_size=6))
    model = build_model(5, cfg.model).to(torch.bfloat16)
    ckpt = checkpoint.make_checkpoint(model, cfg, Vocab(tuple("abcde")))
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ckpt["model"].values())
    checkpoint.save(tmp_path / "m.pt", ckpt)
    rebuilt = checkpoint.model_of(checkpoint.load(tmp_path / "m.pt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_checkpoint_resumes_on_cpu_and_back(tmp_path, text_file):
    from conftest import TINY_CONFIG

    from charlm.config import apply_sets, load_toml
    from charlm.training.setup import train

    cfg = load_toml(TINY_CONFIG)
    apply_sets(cfg, ["train.device=cuda", "train.sample_chars=0", "train.max_steps=30"])
    train(text_file, cfg, out_dir=tmp_path / "gpu", stop_at_step=10, progress=False)
    ckpt = checkpoint.load(tmp_path / "gpu" / "last.pt")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    proc = run_charlm("train", "--resume", tmp_path / "gpu", "--device", "cpu", "--stop-at-step",
                      "20", "--no-progress", env=hidden)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.load(tmp_path / "gpu" / "last.pt")["train_state"]["step"] == 20
    proc = run_charlm("sample", "-c", tmp_path / "gpu" / "last.pt", "-n", "10", env=hidden)
    assert proc.returncode == 0, proc.stderr
    # ... and the CPU-written checkpoint goes back to the GPU.
    cfg.train.device = "cuda"
    result = train(text_file, cfg, out_dir=tmp_path / "gpu",
                   resume=checkpoint.load(tmp_path / "gpu" / "last.pt"), progress=False)
    assert result.step == 30 and result.device.startswith("cuda")


# ---------------------------------------------------------------------------- safe loading
class _ExecPayload:
    """Unpickling this runs Python code that writes ``marker`` (builtins.exec)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _ShellPayload:
    """Unpickling this runs a shell command that creates ``marker`` (os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _malicious(tmp_path: Path, good: Path, kind: str) -> tuple[Path, Path]:
    """A checkpoint that looks like charlm's but creates a marker file when unpickled."""
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / f"evil-{kind}.pt"
    ckpt = torch.load(good, weights_only=True)
    if kind == "exec":
        ckpt["train_state"]["payload"] = _ExecPayload(marker)
        torch.save(ckpt, path)
    elif kind == "system":
        ckpt["vocab"] = _ShellPayload(marker)
        torch.save(ckpt, path)
    else:  # a bare pickle, not torch's zip format, in the oldest and the default protocol
        with open(path, "wb") as f:
            protocol = 2 if kind == "raw" else pickle.DEFAULT_PROTOCOL
            pickle.dump({**ckpt, "x": _ShellPayload(marker)}, f, protocol=protocol)
    # The payload is real: an unsafe load does run it.
    with open(path, "rb") as f:
        pickle.load(f) if kind.startswith("raw") else torch.load(f, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("kind", ["exec", "system", "raw", "raw-default"])
def test_crafted_pickle_is_refused_by_the_library_without_running(tmp_path, tiny_run, kind):
    path, marker = _malicious(tmp_path, tiny_run / "last.pt", kind)
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        checkpoint.load(path)
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_by_info_sample_and_resume(tmp_path, tiny_run, text_file):
    path, marker = _malicious(tmp_path, tiny_run / "last.pt", "system")
    proc = run_charlm("info", path)  # the real command: no traceback, nothing run
    assert_clean_error(proc, "refused to load", "posix.system", "possibly malicious")
    assert not marker.exists()
    for args in (["sample", "-c", path, "-n", "5"],
                 ["train", text_file, "--resume", path, "--no-progress"],
                 ["train", text_file, "--init-from", path, "--no-progress"],
                 ["eval", path, text_file]):
        proc = run_cli(*args)
        assert_clean_error(proc, "refused to load", "possibly malicious")
        assert not marker.exists(), args


# ---------------------------------------------------------------------------- clear errors
def _bad_file(tmp_path: Path, good: Path, kind: str) -> tuple[Path, str]:
    """A damaged or foreign checkpoint file and a phrase its error must contain."""
    path = tmp_path / f"{kind}.pt"
    data = good.read_bytes()
    if kind == "missing":
        return path, "checkpoint not found"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return path, "damaged or truncated"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "damaged or truncated"
    if kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
        return path, "damaged"
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
        return path, "damaged"
    if kind == "flipped":
        # Change bytes inside the stored weights: torch.load alone would not notice.
        ckpt = torch.load(good, weights_only=True)
        raw = bytearray(data)
        probe = ckpt["model"]["head.weight"].numpy().tobytes()[:64]
        at = raw.index(probe)
        raw[at : at + 8] = bytes(8)
        path.write_bytes(bytes(raw))
        return path, "corrupted"
    if kind == "foreign":
        torch.save({"a": 1}, path)
        return path, "is not a charlm checkpoint"
    if kind == "incomplete":
        ckpt = torch.load(good, weights_only=True)
        del ckpt["model"]
        torch.save(ckpt, path)
        return path, "not a complete charlm checkpoint"
    if kind == "newer":
        ckpt = torch.load(good, weights_only=True)
        ckpt["format_version"] = checkpoint.FORMAT_VERSION + 1
        torch.save(ckpt, path)
        return path, "newer than this charlm reads"
    if kind == "directory":
        path.mkdir()
        return path, "not a file"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "truncated", "empty", "random", "text", "flipped", "foreign",
             "incomplete", "newer", "directory"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_is_one_clear_error(tmp_path, tiny_run, kind):
    path, phrase = _bad_file(tmp_path, tiny_run / "last.pt", kind)
    with pytest.raises(CheckpointError, match=phrase) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    proc = run_cli("info", path)
    # On the command line a directory stands for its best.pt or last.pt: here it has neither.
    assert_clean_error(proc, "is a directory with no checkpoint" if kind == "directory" else phrase)
    assert "internal error" not in proc.stderr


def test_damaged_files_are_refused_or_load_unchanged(tmp_path, tiny_run):
    """Random cuts, flipped bytes, deleted runs and noise: every outcome is a CheckpointError
    or the original weights, never another exception and never silently damaged weights."""
    good = (tiny_run / "last.pt").read_bytes()
    original = checkpoint.load(tiny_run / "last.pt")["model"]
    rng = random.Random(1)
    path = tmp_path / "damaged.pt"
    outcomes = {"refused": 0, "intact": 0}
    for i in range(160):
        raw = bytearray(good)
        if i % 4 == 0:
            raw = raw[: rng.randrange(len(raw))]
        elif i % 4 == 1:
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif i % 4 == 2:
            at = rng.randrange(len(raw))
            del raw[at : at + rng.randint(1, 300)]
        else:
            raw = bytearray(rng.randbytes(rng.randint(1, 5000)))
        path.write_bytes(bytes(raw))
        try:
            loaded = checkpoint.load(path)["model"]
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        assert all(torch.equal(loaded[k], original[k]) for k in original), i
        outcomes["intact"] += 1
    assert outcomes["refused"] > 100, outcomes


def test_bad_checkpoint_errors_from_the_real_command(tmp_path, tiny_run, text_file):
    truncated, _ = _bad_file(tmp_path, tiny_run / "last.pt", "truncated")
    proc = run_charlm("train", text_file, "--resume", truncated, "--no-progress")
    assert_clean_error(proc, "damaged or truncated")
    newer, _ = _bad_file(tmp_path, tiny_run / "last.pt", "newer")
    for args in (["info", newer], ["sample", "-c", newer, "-n", "3"]):
        assert_clean_error(run_cli(*args), "newer than this charlm reads", "upgrade charlm")


def test_loading_never_warns_or_prints(tmp_path, tiny_run, capfd, recwarn):
    # torch warns when it meets a pickle protocol it did not write itself.
    path, _ = _malicious(tmp_path, tiny_run / "last.pt", "raw-default")
    for p in (path, tiny_run / "last.pt"):
        try:
            checkpoint.load(p)
        except CheckpointError:
            pass
    assert not recwarn.list
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------- atomic writes
KILL_HARNESS = textwrap.dedent('''
    """Fork writers of last.pt and best.pt and SIGKILL them at random moments."""
    import json, os, random, signal, sys, time
    from pathlib import Path

    import torch
    torch.set_num_threads(1)  # forking after OpenMP work can hang the child
    from charlm.storage import checkpoint
    from charlm.config import Config, ModelConfig
    from charlm.errors import CharlmError
    from charlm.model.network import build_model
    from charlm.data.vocab import Vocab

    root, kills = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(int(sys.argv[3]))
    cfg = Config(model=ModelConfig(embed_size=64, hidden_size=448))  # ~4 MB of weights
    vocab = Vocab(tuple(map(chr, range(64, 128))))
    base = checkpoint.make_checkpoint(build_model(64, cfg.model), cfg, vocab)

    def write(run, mode, step):
        ckpt = {**base, "train_state": {"step": step}}
        for name in ("best.pt", "last.pt"):
            if mode == "atomic":
                checkpoint.save(run / name, ckpt)
            else:  # the naive way, to show this harness notices torn files
                torch.save(ckpt, run / name)

    def steps(run):
        found = []
        for name in ("best.pt", "last.pt"):
            try:
                found.append(checkpoint.load(run / name)["train_state"]["step"])
            except CharlmError as exc:
                found.append(str(exc))
        return found

    reports = {}
    for mode in ("atomic", "naive"):
        run = root / mode
        run.mkdir(parents=True)
        write(run, mode, 0)
        step, report = 1, []
        for k in range(kills):
            pid = os.fork()
            if pid == 0:
                try:
                    for s in range(step, step + 10**6):
                        write(run, mode, s)
                finally:
                    os._exit(0)
            time.sleep(rng.uniform(0.02, 0.25))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            loaded = steps(run)
            report.append({"loaded": loaded, "tmp_files": len(list(run.glob(".*.tmp")))})
            if all(isinstance(s, int) for s in loaded):
                step = max(loaded) + 1
            elif mode == "naive":
                break
        reports[mode] = report
    print(json.dumps(reports))
''')


def test_sigkill_while_writing_never_leaves_an_unloadable_checkpoint(tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text(KILL_HARNESS)
    proc = subprocess.run([sys.executable, harness, tmp_path, "25", "7"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout.strip().splitlines()[-1])

    report = reports["atomic"]
    assert len(report) == 25
    for i, kill in enumerate(report):
        assert all(isinstance(s, int) for s in kill["loaded"]), (i, kill)
    steps = [max(k["loaded"]) for k in report]
    assert steps == sorted(steps) and steps[-1] > 0  # writing went on and never went back
    # The kills did land inside writes: killed writers left their temporary files.
    assert report[-1]["tmp_files"] >= 3, report
    # A new run lock (a resumed `charlm train`) sweeps them away.
    lock = RunLock(tmp_path / "atomic")
    lock.release()
    assert not list((tmp_path / "atomic").glob(".*.tmp"))
    for name in ("best.pt", "last.pt"):
        checkpoint.load(tmp_path / "atomic" / name)

    # The same loop catches a writer that is not atomic (so the checks above can fail).
    naive = reports["naive"]
    assert any(not all(isinstance(s, int) for s in k["loaded"]) for k in naive), naive


def test_failed_write_leaves_the_previous_file(tmp_path, tiny_run):
    target = tmp_path / "last.pt"
    shutil.copy(tiny_run / "last.pt", target)
    before = target.read_bytes()

    def explode(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(target, explode)
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
