"""``charlm.train(...)`` does what ``charlm train`` does, through the same library call
(charlm.training.request): resume, --init-from with --grow-vocab and the dry run give the
same weights, vocabulary and config as the real command, and the same mistakes the same
one-line errors."""

from __future__ import annotations

import logging
import re
import shutil

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, assert_same_weights, run_charlm, run_cli

import charlm
from charlm.errors import CharlmError
from charlm.storage import checkpoint

# Numbers compared across processes: fp32, one thread, no samples.
EXACT = ["--precision", "fp32", "--set", "train.threads=1", "--no-samples"]
EXACT_API = dict(precision="fp32", threads=1, sample_chars=0)

FRENCH = ("Où est la bibliothèque? À côté de l'église, près du marché. Ça coûte très cher.\n"
          "Élève, répète: le garçon mange une pêche à la crème brûlée, déjà.\n") * 40


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def french(tmp_path):
    path = tmp_path / "french.txt"
    path.write_text(FRENCH, encoding="utf-8")
    return path


def test_resume_continues_a_run_exactly_as_the_command_does(text, tmp_path):
    """A run paused by the real command, continued once by `charlm train --resume RUN` and
    once by `charlm.train(resume=RUN)`: the same step and bit-identical weights."""
    paused = tmp_path / "paused"
    proc = run_charlm("train", text, "--config", TINY_CONFIG, "--max-steps", 12,
                      "--eval-every", 6, "--stop-at-step", 5, "--out", paused, "--no-progress",
                      *EXACT)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.load(paused / "last.pt")["train_state"]["step"] == 5
    by_cli, by_api = tmp_path / "by-cli", tmp_path / "by-api"
    shutil.copytree(paused, by_cli)
    shutil.copytree(paused, by_api)

    proc = run_charlm("train", "--resume", by_cli, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = charlm.train(resume=by_api, progress=False)  # the run's own file, config and dir

    assert result.run_dir == by_api and result.step == 12
    cli_ckpt, api_ckpt = checkpoint.load(by_cli / "last.pt"), checkpoint.load(by_api / "last.pt")
    assert cli_ckpt["train_state"]["step"] == api_ckpt["train_state"]["step"] == 12
    assert_same_weights(cli_ckpt, api_ckpt)
    assert cli_ckpt["config"] == api_ckpt["config"]


def test_resume_to_a_step_then_on_like_the_command(text, tmp_path):
    """stop_at_step pauses a resumed run as --stop-at-step does."""
    run = tmp_path / "run"
    first = charlm.train(text, config=TINY_CONFIG, out=run, progress=False, max_steps=10,
                         eval_every=5, stop_at_step=4, **EXACT_API)
    assert first.stopped == "stop_at_step" and first.step == 4
    again = charlm.train(resume=run, progress=False, stop_at_step=7)
    assert again.stopped == "stop_at_step" and again.step == 7


def test_init_from_with_grow_vocab_matches_the_command(tiny_run, french, tmp_path, caplog):
    base = checkpoint.load(tiny_run / "best.pt")
    new = sorted(set(FRENCH) - set(SAMPLE_TEXT))
    proc = run_charlm("train", french, "--init-from", tiny_run / "best.pt", "--grow-vocab",
                      "--config", TINY_CONFIG, "--max-steps", 6, "--eval-every", 3,
                      "--out", tmp_path / "cli", "--no-progress", *EXACT)
    assert proc.returncode == 0, proc.stderr
    with caplog.at_level(logging.INFO, logger="charlm"):
        result = charlm.train(french, init_from=tiny_run / "best.pt", grow_vocab=True,
                              config=TINY_CONFIG, max_steps=6, eval_every=3,
                              out=tmp_path / "api", progress=False, **EXACT_API)
    assert result.step == 6 and result.vocab_size == len(base["vocab"]) + len(new)
    # The note the command prints is the one the API logs.
    grown = next(line for line in proc.stderr.splitlines() if line.startswith("vocabulary grown"))
    assert grown.startswith(f"vocabulary grown by {len(new)} characters: ")
    assert grown in [r.getMessage() for r in caplog.records]

    cli_ckpt = checkpoint.load(tmp_path / "cli" / "last.pt")
    api_ckpt = checkpoint.load(tmp_path / "api" / "last.pt")
    assert cli_ckpt["vocab"] == api_ckpt["vocab"] == base["vocab"] + new
    assert cli_ckpt["vocab_growth"] == api_ckpt["vocab_growth"]
    assert cli_ckpt["train_state"]["step"] == api_ckpt["train_state"]["step"] == 6
    assert_same_weights(cli_ckpt, api_ckpt)


def _dry_run_numbers(stderr: str) -> tuple[int, int]:
    found = re.search(r"model: ([\d,]+) parameters, vocabulary ([\d,]+) characters; dry run",
                      stderr)
    assert found, stderr
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def test_dry_run_returns_what_the_command_prints(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    proc = run_charlm("train", text, "--config", TINY_CONFIG, "--hidden-size", 48,
                      "--set", "train.lr=0.005", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    r = charlm.train(text, config=TINY_CONFIG, hidden_size=48, lr=0.005, dry_run=True)
    assert r.config_toml.rstrip() == proc.stdout.rstrip()
    assert (r.num_parameters, r.vocab_size) == _dry_run_numbers(proc.stderr)
    assert r.config.model.hidden_size == 48 and r.config.train.lr == 0.005 and not r.sized
    assert list(tmp_path.iterdir()) == [text]  # nothing trained, no run directory


def test_dry_run_of_a_grown_init_from(tiny_run, french, tmp_path):
    proc = run_cli("train", french, "--init-from", tiny_run / "best.pt", "--grow-vocab",
                   "--config", TINY_CONFIG, "--dry-run", "--out", tmp_path / "grown")
    assert proc.returncode == 0, proc.stderr
    r = charlm.train(french, init_from=tiny_run / "best.pt", grow_vocab=True,
                     config=TINY_CONFIG, dry_run=True, out=tmp_path / "grown")
    assert r.config_toml.rstrip() == proc.stdout.rstrip()
    assert (r.num_parameters, r.vocab_size) == _dry_run_numbers(proc.stderr)
    assert not (tmp_path / "grown").exists()


def _bad_calls(text, tmp_path, tiny_run):
    """(command-line arguments, charlm.train keywords) of the same mistake."""
    ckpt = tiny_run / "best.pt"
    return {
        "resume and init_from": (["--resume", tmp_path / "r", "--init-from", ckpt],
                                 dict(resume=tmp_path / "r", init_from=ckpt)),
        "allow_other_data alone": ([text, "--allow-other-data"],
                                   dict(path=text, allow_other_data=True)),
        "drop_unknown alone": ([text, "--drop-unknown"], dict(path=text, drop_unknown=True)),
        "grow_vocab alone": ([text, "--grow-vocab"], dict(path=text, grow_vocab=True)),
        "grow_vocab and drop_unknown": (
            [text, "--init-from", ckpt, "--grow-vocab", "--drop-unknown"],
            dict(path=text, init_from=ckpt, grow_vocab=True, drop_unknown=True)),
        "negative stop_at_step": ([text, "--stop-at-step", "-1", "--config", TINY_CONFIG],
                                  dict(path=text, stop_at_step=-1, config=TINY_CONFIG)),
        "resume of a missing checkpoint": (["--resume", ckpt.parent / "nothing.pt"],
                                   dict(resume=ckpt.parent / "nothing.pt")),
        "resume of a run without training state": (["--resume", tmp_path / "weights.pt"],
                                                   dict(resume=tmp_path / "weights.pt")),
    }


@pytest.mark.parametrize("case", [
    "resume and init_from", "allow_other_data alone", "drop_unknown alone", "grow_vocab alone",
    "grow_vocab and drop_unknown", "negative stop_at_step", "resume of a missing checkpoint",
    "resume of a run without training state",
])
def test_the_same_mistakes_give_the_same_errors(case, text, tmp_path, tiny_run):
    ckpt = checkpoint.load(tiny_run / "best.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "train_state"}, tmp_path / "weights.pt")
    args, kwargs = _bad_calls(text, tmp_path, tiny_run)[case]
    proc = run_cli("train", *args, "--out", tmp_path / "out", "--no-progress")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    with pytest.raises(CharlmError) as caught:
        charlm.train(**kwargs, out=tmp_path / "out", progress=False)
    assert f"error: {caught.value}" == lines[0]
    assert caught.value.exit_code == proc.returncode
    assert not (tmp_path / "out").exists()
