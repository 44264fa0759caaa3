"""The Python API: ``import charlm`` stays light; ``charlm.load(...).generate`` gives what
``charlm sample`` prints and ``.evaluate`` what ``charlm eval`` reports; ``charlm.train``
trains like ``charlm train``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, run_charlm, run_cli

import charlm
from charlm.errors import CharlmError, ConfigError
from charlm.storage import checkpoint


@pytest.fixture(scope="module")
def model(tiny_run):
    return charlm.load(tiny_run / "best.pt")


def test_import_charlm_does_not_import_torch():
    code = ("import sys, charlm\n"
            "charlm.__version__, charlm.tiny_shakespeare(), charlm.Model, charlm.load\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert callable(charlm.train)\n"  # the module charlm.train: now torch is in
            "assert 'torch' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_surface():
    assert set(charlm.__all__) == {"Model", "load", "train", "tiny_shakespeare", "__version__"}
    with pytest.raises(AttributeError):
        charlm.no_such_thing  # noqa: B018


@pytest.mark.parametrize("options", [
    dict(temperature=0.8, random_seed=7),
    dict(temperature=0),
    dict(temperature=1.2, top_k=5, top_p=0.9, random_seed=3),
])
def test_generate_equals_charlm_sample(tiny_run, model, options):
    texts = model.generate("First", length=60, **options)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    proc = run_charlm("sample", "-c", tiny_run / "best.pt", "--seed", "First", "--length", "60",
                      *args)
    assert proc.returncode == 0, proc.stderr
    assert texts == [proc.stdout.removesuffix("\n")]
    assert texts[0].startswith("First") and len(texts[0]) == 5 + 60


def test_several_samples_equal_charlm_sample(tiny_run, model):
    texts = model.generate("All:", length=30, num_samples=3, random_seed=11, top_k=10)
    proc = run_cli("sample", "-c", tiny_run / "best.pt", "--seed", "All:", "--length", "30",
                   "--num-samples", "3", "--random-seed", "11", "--top-k", "10")
    assert proc.returncode == 0, proc.stderr
    printed = [block.split("\n", 1)[1].rstrip("\n")
               for block in proc.stdout.split("--- sample ")[1:]]
    # (the printed blocks lose a text's own trailing newline to the parse above)
    assert [t.rstrip("\n") for t in texts] == printed and len(set(texts)) > 1
    assert model.generate("All:", length=30, num_samples=3, random_seed=11, top_k=10,
                          include_seed=False) == [t[4:] for t in texts]


def test_generate_checks_seed_and_options(model):
    with pytest.raises(CharlmError, match="not in the model's vocabulary"):
        model.generate("Zq", length=5)
    assert model.generate("Zq?", length=0, drop_unknown=True) == ["?"]
    with pytest.raises(CharlmError, match="--top-p"):
        model.generate("A", length=5, top_p=0)


def test_generate_forwards_extra_options(model):
    # Options the sampler does not know reach it (they are how new sampling features plug in).
    with pytest.raises(TypeError, match="no_such_option"):
        model.generate("A", length=5, no_such_option=1)


def test_evaluate_equals_charlm_eval(tiny_run, model, tmp_path):
    path = tmp_path / "other.txt"
    path.write_text("First Citizen:\nZounds! 42 quiz.\n" * 20, encoding="utf-8")
    proc = run_charlm("eval", tiny_run / "best.pt", path, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for r in (model.evaluate(path), model.evaluate(str(path))):  # a Path, or a str naming it
        assert (r.loss, r.bpc, r.perplexity, r.chars, r.unknown) == (
            doc["loss"], doc["bits_per_char"], doc["perplexity"], doc["chars"], doc["unknown"])
    # The text itself (a str that is no file) gives the same numbers.
    text = model.evaluate(path.read_text(encoding="utf-8"))
    assert text.loss == pytest.approx(doc["loss"], rel=1e-6) and text.unknown == 100


def test_load_refuses_what_sample_refuses(tiny_run, tmp_path):
    with pytest.raises(CharlmError, match="checkpoint not found"):
        charlm.load(tmp_path / "nope.pt")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="no MPS"):
            charlm.load(tiny_run / "best.pt", device="mps")


def test_safetensors_export_loads_like_the_checkpoint(tiny_run, model, tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "m.safetensors"
    proc = run_cli("export", tiny_run / "best.pt", "--format", "safetensors", "-o", out)
    assert proc.returncode == 0, proc.stderr
    exported = charlm.load(out)
    assert exported.generate("First", length=40, random_seed=2) == \
        model.generate("First", length=40, random_seed=2)


def test_train(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    result = charlm.train(text, config=TINY_CONFIG, out=tmp_path / "run", progress=False,
                          cell="gru", max_steps=4, eval_every=2, sample_chars=0, threads=1,
                          device="cpu", precision="fp32")
    assert result.run_dir == tmp_path / "run" and result.step == 4
    ckpt = checkpoint.load(tmp_path / "run" / "last.pt")
    assert ckpt["config"]["model"]["cell"] == "gru" and ckpt["config"]["model"]["hidden_size"] == 32
    assert charlm.load(tmp_path / "run" / "best.pt").config.model.cell == "gru"
    with pytest.raises(ConfigError, match="unknown option 'hiden_size'.*hidden_size"):
        charlm.train(text, hiden_size=3)
    with pytest.raises(ConfigError, match="max_steps"):
        charlm.train(text, max_steps="many")


def test_onnx_export_samples_through_the_api(tiny_run, model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    proc = run_cli("export", tiny_run / "best.pt", "--format", "onnx", "-o", out)
    assert proc.returncode == 0, proc.stderr
    exported = charlm.load(out)
    greedy = exported.generate("First", length=40, temperature=0)
    assert greedy == model.generate("First", length=40, temperature=0)
    printed = run_cli("sample", "-c", out, "--seed", "First", "-n", "40", "--random-seed", "5")
    assert [printed.stdout.removesuffix("\n")] == exported.generate("First", 40, random_seed=5)
    with pytest.raises(CharlmError, match="ONNX export, which can only sample"):
        exported.evaluate("First Citizen:\n")
