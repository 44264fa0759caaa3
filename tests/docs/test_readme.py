"""The README cannot drift from the code: it stays short, its links and those of docs/ resolve,
and its quick start and Python example run, at tiny scale, against the real ``charlm``."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHAKESPEARE, TEST_PRECISION, run_charlm

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_BYTES = 10_500

# Appended to every `charlm train` of the quick start, and given to the Python example's
# charlm.train: the tiny model of configs/tiny.toml (same cell as the README's config, so the
# run directory it names still exists) for 3 steps.
TINY_TRAIN_ARGS = ["--embed-size", "16", "--hidden-size", "32", "--batch-size", "8",
                   "--seq-len", "16", "--max-steps", "3", "--precision", TEST_PRECISION,
                   "--device", "cpu", "--set", "train.eval_streams=4",
                   "--set", "train.eval_seq_len=64", "--eval-every", "3", "--log-every", "3",
                   "--no-samples", "--no-progress"]
TINY_TRAIN_KWARGS = {"embed_size": 16, "hidden_size": 32, "batch_size": 8, "seq_len": 16,
                     "max_steps": 3, "precision": TEST_PRECISION, "device": "cpu",
                     "eval_streams": 4, "eval_seq_len": 64, "eval_every": 3, "log_every": 3,
                     "sample_chars": 0}


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def first_block(text: str, lang: str) -> str:
    match = re.search(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)
    assert match, f"no ```{lang} block"
    return match.group(1)


def quick_start_commands() -> list[list[str]]:
    """The commands of the first ```bash block under '## Quick start', as argument lists."""
    block = first_block(section(README.read_text(encoding="utf-8"), "Quick start"), "bash")
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [c for c in commands if c]


def workdir(tmp_path: Path) -> Path:
    """A folder laid out as the README assumes: configs/ of the checkout and an input.txt
    (20 KB of tiny Shakespeare from ROMEO's first line, so the README's seed is in its vocabulary)."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    start = text.index("ROMEO:")
    (tmp_path / "input.txt").write_text(text[start:start + 20_000], encoding="utf-8")
    return tmp_path


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size:,} bytes; move detail to docs/"


def test_relative_links_resolve():
    link = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
    missing = []
    for page in [README, *DOCS]:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in link.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert DOCS, "docs/ has no pages"
    assert not missing, "links to missing files: " + ", ".join(missing)


def test_readme_links_every_docs_page():
    readme = README.read_text(encoding="utf-8")
    for page in DOCS:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_setup_commands_unchanged():
    """The two setup commands: CI (.ci/run) runs the test command, so it must stay."""
    setup = first_block(section(README.read_text(encoding="utf-8"), "Setup"), "bash")
    lines = [line.split("#")[0].strip() for line in setup.splitlines()]
    assert lines == ['pip install -e ".[dev]" && charlm train --config configs/cpu.toml',
                     "python -m pytest -q -n auto"]
    assert "python3 -m pytest -q -n auto" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_quick_start_runs(tmp_path):
    commands = quick_start_commands()
    assert commands and commands[0][:2] == ["charlm", "train"], commands
    cwd = workdir(tmp_path)
    for command in commands:
        assert command[0] == "charlm", f"the quick start runs charlm only: {command}"
        args = command[1:] + (TINY_TRAIN_ARGS if command[1] == "train" else [])
        proc = run_charlm(*args, cwd=cwd, timeout=120)
        assert proc.returncode == 0, f"{shlex.join(command)}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
        if command[1] == "sample":
            seed = command[command.index("--seed") + 1]
            assert proc.stdout.startswith(seed) and len(proc.stdout) > len(seed) + 100
    assert (cwd / "runs" / "input-gru" / "best.pt").is_file()


def test_python_example_runs(tmp_path, monkeypatch, capsys):
    import charlm

    code = first_block(section(README.read_text(encoding="utf-8"), "Python"), "python")
    real_train = charlm.train
    calls = []

    def tiny_train(*args, **kwargs):
        calls.append((args, kwargs))
        return real_train(*args, **{**kwargs, **TINY_TRAIN_KWARGS, "progress": False})

    monkeypatch.setattr(charlm, "train", tiny_train)
    monkeypatch.chdir(workdir(tmp_path))
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert out.count("ROMEO:") >= 2, out  # the two samples, each starting with the seed
    assert (tmp_path / "runs" / "py" / "best.pt").is_file()


def test_docs_onnx_snippet_runs_without_torch_or_charlm(exports, tmp_path):
    """docs/export.md's stand-alone ONNX sampler, run as written with torch and charlm made
    unimportable (onnxruntime and numpy only)."""
    pytest.importorskip("onnxruntime")
    from charlm.storage.checkpoint import load_model

    doc = (REPO / "docs" / "export.md").read_text(encoding="utf-8")
    code = first_block(section(doc, "The ONNX format, and sampling without charlm"), "python")
    assert 'ort.InferenceSession("model.onnx")' in code
    (tmp_path / "model.onnx").write_bytes(exports["onnx"].read_bytes())
    prelude = "import sys; sys.modules['torch'] = None; sys.modules['charlm'] = None\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.removesuffix("\n")
    vocab = load_model(exports["onnx"].with_suffix(".pt"))[1]
    assert text.startswith("First") and len(text) == len("First") + 200
    assert not vocab.unknown_chars(text)
