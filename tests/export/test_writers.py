"""Export: safetensors and ONNX files rebuild the same model (logits within 1e-4 at batch 1 and
4, identical greedy text), a failed check leaves no file, and the ONNX path runs without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, assert_clean_error, run_charlm

from charlm.config import CELLS, Config
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError, CheckpointError
from charlm.evaluate import evaluate_file
from charlm.export import writers as export
from charlm.model.network import build_model, state_from_tensors, state_tensors
from charlm.sampling.sampler import generate
from charlm.storage import checkpoint
from charlm.storage import onnx as onnx_runtime

GREEDY_CHARS = 200


def make_checkpoint_file(path: Path, cell: str, train_steps: int = 0, seed: int = 0) -> Path:
    """A small 2-layer model, trained for ``train_steps`` steps on SAMPLE_TEXT, so that its
    greedy text is varied (random weights mostly repeat one character: a weak test)."""
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model.cell, cfg.model.embed_size, cfg.model.hidden_size, cfg.model.num_layers = cell, 16, 32, 2
    vocab = Vocab.from_text(SAMPLE_TEXT)
    model = build_model(len(vocab), cfg.model)
    ids = torch.from_numpy(vocab.encode(SAMPLE_TEXT[:400]).astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds overhead
    try:
        for _ in range(train_steps):
            starts = torch.randint(0, len(ids) - 33, (16, 1))
            x = ids[starts + torch.arange(33)]  # (B, T + 1)
            logits, _ = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    checkpoint.save(path, checkpoint.make_checkpoint(model.eval(), cfg, vocab))
    return path


@pytest.fixture(scope="module", params=CELLS)
def exported(request, tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per cell and its two verified exports (the ONNX export takes seconds)."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    pt = make_checkpoint_file(root / "model.pt", request.param, train_steps=40)
    return {
        "cell": request.param,
        "pt": pt,
        "safetensors": export.export_checkpoint(pt, "safetensors").path,
        "onnx": export.export_checkpoint(pt, "onnx").path,
    }


def _random_inputs(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    ids = torch.randint(0, model.vocab_size, (batch, 1), generator=g)  # (B, 1)
    n = 2 if cfg.cell == "lstm" else 1
    state = [torch.randn(cfg.num_layers, batch, cfg.hidden_size, generator=g) for _ in range(n)]
    return ids, state


@pytest.mark.parametrize("batch", [1, 4])
def test_logits_and_states_match_pytorch(exported, batch):
    model, vocab = checkpoint.load_model(exported["pt"])
    from_st, st_vocab = checkpoint.load_model(exported["safetensors"])
    onnx_model = onnx_runtime.load(exported["onnx"])
    assert st_vocab == vocab and onnx_model.vocab == vocab
    ids, state = _random_inputs(model, batch, seed=7 + batch)
    with torch.no_grad():
        logits, new = model(ids, state_from_tensors(state, model.cfg.cell))
        want = [logits[:, -1], *state_tensors(new)]  # (B, V), (L, B, H)...
        st_logits, st_new = from_st(ids, state_from_tensors(state, model.cfg.cell))
    got_st = [st_logits[:, -1], *state_tensors(st_new)]
    o_logits, o_state = onnx_model.step(ids[:, 0].numpy(), [s.numpy() for s in state])
    got_onnx = [o_logits, *o_state]
    assert len(got_onnx) == len(want)
    for w, s, o in zip(want, got_st, got_onnx, strict=True):
        assert tuple(o.shape) == tuple(w.shape)
        assert torch.equal(s, w)
        assert np.abs(o - w.numpy()).max() < 1e-4


def test_greedy_text_identical_from_pt_safetensors_and_onnx(exported):
    model, vocab = checkpoint.load_model(exported["pt"])
    from_st, _ = checkpoint.load_model(exported["safetensors"])
    onnx_model = onnx_runtime.load(exported["onnx"])
    seed = vocab.encode("First").tolist()
    text_pt = generate(model, vocab, seed, GREEDY_CHARS, temperature=0)[0]
    text_st = generate(from_st, vocab, seed, GREEDY_CHARS, temperature=0)[0]
    text_onnx = onnx_runtime.generate(onnx_model, vocab, seed, GREEDY_CHARS, temperature=0)[0]
    assert len(text_pt) == GREEDY_CHARS
    assert len(set(text_pt)) >= 3, text_pt  # not a degenerate model
    assert text_st == text_pt
    assert text_onnx == text_pt


def test_onnx_file_has_dynamic_batch_and_metadata(exported):
    proto = onnx.load(str(exported["onnx"]))
    names = ["ids", "h", "c"] if exported["cell"] == "lstm" else ["ids", "h"]
    assert [i.name for i in proto.graph.input] == names
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        batch = dims[0] if value.name in ("ids", "logits") else dims[1]
        assert batch.dim_param and not batch.dim_value, value.name
    meta = {p.key: p.value for p in proto.metadata_props}
    ckpt = checkpoint.load(exported["pt"])
    assert meta["format"] == onnx_runtime.FORMAT and meta["format_version"] == "1"
    assert json.loads(meta["vocab"]) == ckpt["vocab"]
    assert json.loads(meta["config"]) == ckpt["config"]


def test_safetensors_schema(exported):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    ckpt = checkpoint.load(exported["pt"])
    tensors = load_file(str(exported["safetensors"]))
    assert sorted(tensors) == sorted(ckpt["model"])
    for name, value in ckpt["model"].items():
        assert tensors[name].dtype == np.float32
        assert np.array_equal(tensors[name], value.numpy())
    with safe_open(str(exported["safetensors"]), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "charlm-safetensors" and meta["format_version"] == "1"
    assert json.loads(meta["vocab"]) == ckpt["vocab"]
    assert json.loads(meta["config"])["model"] == ckpt["config"]["model"]


def test_safetensors_rebuilds_with_plain_torch(exported):
    """The README schema is enough: nn.Embedding -> nn.RNN/LSTM/GRU -> nn.Linear, built from
    the metadata alone, with the tensors loaded by name, gives charlm's logits."""
    from safetensors import safe_open

    with safe_open(str(exported["safetensors"]), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(meta["config"])["model"]
    V = len(json.loads(meta["vocab"]))
    cell = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[m["cell"]]
    embed = torch.nn.Embedding(V, m["embed_size"])
    rnn = cell(m["embed_size"], m["hidden_size"], m["num_layers"], batch_first=True)
    head = torch.nn.Linear(m["hidden_size"], V)
    for prefix, module in (("embed.", embed), ("rnn.", rnn), ("head.", head)):
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    model, vocab = checkpoint.load_model(exported["pt"])
    ids = torch.from_numpy(vocab.encode(SAMPLE_TEXT[:50]).astype(np.int64))[None]  # (1, T)
    with torch.no_grad():
        want, _ = model(ids)
        got = head(rnn(embed(ids))[0])  # (1, T, V)
    assert torch.allclose(got, want, atol=1e-5)


def test_eval_reads_safetensors(exported, tmp_path):
    text_file = tmp_path / "short.txt"
    text_file.write_text(SAMPLE_TEXT[:600], encoding="utf-8")
    from_pt = evaluate_file(exported["pt"], text_file, device="cpu")
    from_st = evaluate_file(exported["safetensors"], text_file, device="cpu")
    assert from_st.loss == pytest.approx(from_pt.loss, abs=1e-6)
    assert from_st.chars == from_pt.chars


def test_onnx_fixed_batch_is_refused(exported):
    proto = onnx.load(str(exported["onnx"]))
    model, _ = checkpoint.load_model(exported["pt"])
    export.check_onnx_shapes(proto, model)  # the real export passes
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    with pytest.raises(CharlmError, match="fixed the batch size of 'ids'"):
        export.check_onnx_shapes(proto, model)


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    pt = make_checkpoint_file(tmp_path / "m.pt", "gru")
    original = export.safetensors_bytes

    def perturbed(ckpt):  # an export whose weights differ from the checkpoint's
        bad = dict(ckpt, model={k: v.clone() for k, v in ckpt["model"].items()})
        bad["model"]["head.bias"] += 1e-3
        return original(bad)

    monkeypatch.setattr(export, "safetensors_bytes", perturbed)
    with pytest.raises(CharlmError, match="verification failed: logits differs from PyTorch"):
        export.export_checkpoint(pt, "safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    # With --force over an existing file, the old file stays as it was.
    old = tmp_path / "m.safetensors"
    old.write_bytes(b"previous")
    with pytest.raises(CharlmError, match="verification failed"):
        export.export_checkpoint(pt, "safetensors", force=True)
    assert old.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.safetensors"]


def test_existing_output_needs_force(tmp_path):
    pt = make_checkpoint_file(tmp_path / "m.pt", "rnn")
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(CharlmError, match="already exists; pass --force"):
        export.export_checkpoint(pt, "safetensors")
    assert out.read_bytes() == b"keep me"
    assert export.export_checkpoint(pt, "safetensors", force=True).path == out
    assert checkpoint.load_model(out)[1] == checkpoint.load_model(pt)[1]
    with pytest.raises(CharlmError, match="must end in .onnx"):
        export.export_checkpoint(pt, "onnx", tmp_path / "m.bin")
    with pytest.raises(CharlmError, match="--format must be one of"):
        export.export_checkpoint(pt, "tflite")


@pytest.mark.parametrize(
    ("fmt", "modules"),
    [("safetensors", ["safetensors", "safetensors.torch"]), ("onnx", ["onnx"])],
)
def test_missing_extra_is_one_line_with_install_hint(tmp_path, monkeypatch, fmt, modules):
    pt = make_checkpoint_file(tmp_path / "m.pt", "rnn")
    for name in modules:  # None in sys.modules makes the import raise ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(CharlmError) as info:
        export.export_checkpoint(pt, fmt)
    message = str(info.value)
    assert 'pip install "charlm[export]"' in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_onnxruntime_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CharlmError, match=r'pip install "charlm\[export\]"'):
        onnx_runtime.load(tmp_path / "m.onnx")


def test_damaged_exports_are_refused(tmp_path, exported):
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(exported["onnx"].read_bytes()[:500])
    with pytest.raises(CheckpointError, match="damaged or not an ONNX model"):
        onnx_runtime.load(bad_onnx)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(exported["safetensors"].read_bytes()[:300])
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file"):
        checkpoint.load_model(bad_st)
    with pytest.raises(CheckpointError, match="only `charlm sample` reads"):
        checkpoint.load_model(exported["onnx"])


def test_numpy_pick_rules():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, dtype=np.float32))  # (B, V)
    assert (onnx_runtime.pick(logits, 0.0, 0, 1.0, rng) == 0).all()
    top2 = onnx_runtime.pick(logits, 1.0, 2, 1.0, rng)
    assert set(top2.tolist()) == {0, 1}
    nucleus = onnx_runtime.pick(logits, 1.0, 0, 0.7, rng)  # 0.5 + 0.3 reach 0.7
    assert set(nucleus.tolist()) == {0, 1}
    full = onnx_runtime.pick(logits, 1.0, 0, 1.0, rng)
    freq = np.bincount(full, minlength=4) / len(full)
    assert np.abs(freq - [0.5, 0.3, 0.15, 0.05]).max() < 0.04
    a = onnx_runtime.pick(logits, 1.0, 0, 1.0, np.random.default_rng(3))
    b = onnx_runtime.pick(logits, 1.0, 0, 1.0, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_cli_export_then_sample(tmp_path):
    """The real command writes both files; `charlm sample` reads each (greedy text as from .pt)."""
    pt = make_checkpoint_file(tmp_path / "m.pt", "gru", train_steps=20, seed=1)
    model, vocab = checkpoint.load_model(pt)
    want = "First" + generate(model, vocab, vocab.encode("First").tolist(), 100, temperature=0)[0]
    for fmt, out in (("safetensors", None), ("onnx", tmp_path / "exported.onnx")):
        proc = run_charlm("export", pt, "--format", fmt, *(["--output", out] if out else []))
        assert proc.returncode == 0, proc.stderr
        assert "max |diff| from PyTorch" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.onnx", "m.pt", "m.safetensors"]
    proc = run_charlm("sample", "-c", tmp_path / "m.safetensors", "-t", "0", "-n", 100,
                      "--seed", "First")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"


def test_cli_export_of_corrupted_checkpoint_fails_cleanly(tmp_path):
    pt = make_checkpoint_file(tmp_path / "m.pt", "lstm")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    proc = run_charlm("export", damaged, "--format", "onnx")
    assert_clean_error(proc, "damaged")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        export.export_checkpoint(garbage, "safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.pt", "garbage.pt", "m.pt"]


BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def test_onnx_sampling_runs_without_torch(exported):
    """`charlm sample -c model.onnx` through the real CLI code, with torch made unimportable:
    greedy text as from the .pt file; seeded sampling with every option is repeatable."""
    model, vocab = checkpoint.load_model(exported["pt"])
    want = generate(model, vocab, vocab.encode("First").tolist(), 60, temperature=0)[0]
    onnx_path = str(exported["onnx"])
    code = BLOCK_TORCH + (
        "from charlm.cli.commands import main\n"
        "def run(*args):\n"
        "    try:\n"
        f"        main(['sample', '-c', {onnx_path!r}, *args])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "    print('=====', flush=True)\n"
        "run('-t', '0', '-n', '60', '--seed', 'First')\n"
        "for _ in range(2):\n"
        "    run('-t', '0.8', '--top-k', '5', '--top-p', '0.9', '-n', '40', '--num-samples', '2',"
        " '--random-seed', '4')\n"
        "assert 'torch' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    greedy, first, second, _ = proc.stdout.split("=====\n")
    assert greedy == "First" + want + "\n"
    assert first == second and "--- sample 2 ---" in first


# The stand-alone snippet of the README, run as written (onnxruntime and numpy only).
README_SNIPPET = '''
import json

import numpy as np
import onnxruntime as ort

session = ort.InferenceSession("model.onnx")
meta = session.get_modelmeta().custom_metadata_map
vocab = json.loads(meta["vocab"])  # id -> character
cfg = json.loads(meta["config"])["model"]  # cell, hidden_size, num_layers, ...
names = ["h", "c"] if cfg["cell"] == "lstm" else ["h"]
state = [np.zeros((cfg["num_layers"], 1, cfg["hidden_size"]), np.float32) for _ in names]


def step(char_id, state):
    feeds = {"ids": np.array([[char_id]], np.int64), **dict(zip(names, state))}
    logits, *state = session.run(None, feeds)  # logits (1, V), state [(L, 1, H)...]
    return logits[0], state


rng = np.random.default_rng(0)
text = "First"
for ch in text:
    logits, state = step(vocab.index(ch), state)
for _ in range(200):
    p = np.exp((logits - logits.max()) / 0.8)  # temperature 0.8
    char_id = rng.choice(len(p), p=p / p.sum())
    text += vocab[char_id]
    logits, state = step(char_id, state)
print(text)
'''


def test_readme_snippet_runs_without_torch_or_charlm(exported, tmp_path):
    (tmp_path / "model.onnx").write_bytes(exported["onnx"].read_bytes())
    code = BLOCK_TORCH + "sys.modules['charlm'] = None\n" + README_SNIPPET
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.removesuffix("\n")
    vocab = checkpoint.load_model(exported["pt"])[1]
    assert text.startswith("First") and len(text) == 205
    assert not vocab.unknown_chars(text)
