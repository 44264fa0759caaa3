"""Fine-tuning on text with new characters: --init-from CKPT --grow-vocab keeps the old ids and
weights, adds rows for the new characters, and the grown model samples, shows and exports."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, assert_clean_error, run_charlm, run_cli

from charlm.data.vocab import Vocab, code_points
from charlm.sampling.sampler import generate
from charlm.storage import checkpoint

FRENCH = ("Où est la bibliothèque? À côté de l'église, près du marché. Ça coûte très cher.\n"
          "Élève, répète: le garçon mange une pêche à la crème brûlée, déjà.\n") * 40
NEW = sorted(set(FRENCH) - set(SAMPLE_TEXT))


def test_vocab_grow_appends_new_characters_and_keeps_ids():
    old = Vocab.from_text("bca \n")
    grown = old.grow(code_points("é a b à z"))
    assert grown.chars == old.chars + ("z", "à", "é")
    assert grown.encode("cab \n").tolist() == old.encode("cab \n").tolist()
    assert grown.decode(grown.encode("zéà b")) == "zéà b"
    assert Vocab.from_json(grown.to_json()) == grown  # unsorted now, but unique
    assert old.grow(code_points("abc")) == old
    with pytest.raises(ValueError):
        Vocab(("a", "b", "a"))


def test_grow_checkpoint_keeps_old_weights_and_logits(tiny_run):
    base = checkpoint.load(tiny_run / "best.pt")
    grown, added = checkpoint.grow_vocab(base, code_points(FRENCH))
    assert added == NEW and grown["vocab"] == base["vocab"] + NEW
    V, n = len(base["vocab"]), len(NEW)
    for key in checkpoint.VOCAB_ROWS:
        old_w, new_w = base["model"][key], grown["model"][key]
        assert torch.equal(new_w[:V], old_w)
        assert torch.allclose(new_w[V:], old_w.mean(0).expand(n, *old_w.shape[1:]))
    assert grown["vocab_growth"] == [{"base_size": V, "added": "".join(NEW)}]
    # Over the old characters the grown model computes exactly what the base model did.
    ids = torch.from_numpy(checkpoint.vocab_of(base).encode(SAMPLE_TEXT[:50]).astype(np.int64))[None]
    with torch.no_grad():
        want, _ = checkpoint.model_of(base)(ids)
        got, _ = checkpoint.model_of(grown)(ids)
    assert torch.equal(got[..., :V], want)
    assert checkpoint.grow_vocab(base, code_points("All"))[0] is base  # nothing new


def test_fine_tune_with_grown_vocabulary_samples_old_and_new(tiny_run, tmp_path):
    text = tmp_path / "french.txt"
    text.write_text(FRENCH, encoding="utf-8")
    out = tmp_path / "grown"
    args = ["train", text, "--init-from", tiny_run / "best.pt", "--config", TINY_CONFIG,
            "--max-steps", 40, "--out", out, "--no-progress", "--no-samples"]
    proc = run_charlm(*args, "--grow-vocab")
    assert proc.returncode == 0, proc.stderr
    shown = ", ".join(repr(c) for c in NEW[:8])
    assert f"vocabulary grown by {len(NEW)} characters: {shown}" in proc.stderr
    base = checkpoint.load(tiny_run / "best.pt")
    tuned = checkpoint.load(out / "best.pt")
    assert tuned["vocab"] == base["vocab"] + NEW
    assert tuned["vocab_growth"] == [{"base_size": len(base["vocab"]), "added": "".join(NEW)}]

    info = run_charlm("info", out / "best.pt")
    assert info.returncode == 0, info.stderr
    assert f"{len(base['vocab'])} + {len(NEW)} characters: {repr(NEW[0])}" in info.stdout
    assert all(repr(c) in " ".join(info.stdout.split()) for c in NEW if c.isalpha())

    # A seed with the new characters works, and the samples hold old and new characters.
    sample = run_charlm("sample", "-c", out / "best.pt", "--seed", "À côté, très", "-n", 300,
                        "--num-samples", 4, "-t", 1, "--random-seed", 0)
    assert sample.returncode == 0, sample.stderr
    generated = re.sub(r"--- sample \d ---\n", "", sample.stdout).replace("À côté, très", "")
    assert set(generated) & set(NEW), generated
    assert set(generated) - set(NEW) <= set(base["vocab"]) and len(set(generated) - set(NEW)) > 5

    # Resuming the grown run keeps the record; refused combinations.
    resumed = run_cli("train", text, "--resume", out, "--max-steps", 42, "--no-progress",
                      "--no-samples")
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(out / "last.pt")["vocab_growth"] == tuned["vocab_growth"]
    assert_clean_error(run_cli(*args[:2], "--grow-vocab"), "--grow-vocab", "--init-from")
    assert_clean_error(run_cli(*args, "--grow-vocab", "--drop-unknown"), "--grow-vocab")
    assert_clean_error(run_cli(*args[:-4], "--out", tmp_path / "x", "--no-progress"),
                       "--drop-unknown", "--grow-vocab")


def test_dry_run_reports_the_grown_vocabulary(tiny_run, tmp_path):
    text = tmp_path / "french.txt"
    text.write_text(FRENCH, encoding="utf-8")
    base = len(checkpoint.load(tiny_run / "best.pt")["vocab"])
    proc = run_cli("train", text, "--init-from", tiny_run / "best.pt", "--config", TINY_CONFIG,
                   "--grow-vocab", "--dry-run", "--out", tmp_path / "grown")
    assert proc.returncode == 0, proc.stderr
    assert f"vocabulary {base + len(NEW):,} characters; dry run" in proc.stderr
    assert not (tmp_path / "grown").exists()


def test_grown_model_exports_and_samples(tiny_run, tmp_path):
    from charlm.export.writers import export_checkpoint
    from charlm.storage import onnx as onnx_runtime

    grown, _ = checkpoint.grow_vocab(checkpoint.load(tiny_run / "best.pt"), code_points(FRENCH))
    pt = tmp_path / "grown.pt"
    checkpoint.save(pt, grown)
    model, vocab = checkpoint.load_model(pt)
    seed = vocab.encode("À côté").tolist()
    want = generate(model, vocab, seed, 40, temperature=0)[0]
    st_path = export_checkpoint(pt, "safetensors", None, False).path
    onnx_path = export_checkpoint(pt, "onnx", None, False).path
    st_model, st_vocab = checkpoint.load_model(st_path)
    assert st_vocab == vocab and generate(st_model, vocab, seed, 40, temperature=0)[0] == want
    onnx_model = onnx_runtime.load(onnx_path)
    assert onnx_model.vocab == vocab
    assert onnx_runtime.generate(onnx_model, vocab, seed, 40, temperature=0)[0] == want
    proc = run_cli("sample", "-c", onnx_path, "--seed", "À côté", "-n", 40, "-t", 0)
    assert proc.returncode == 0 and proc.stdout == "À côté" + want + "\n"
