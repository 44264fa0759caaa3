"""``charlm inspect``: activations and gates against PyTorch's own modules, the feature finder
on planted units, the memory curve against evaluation, bits/char against ``charlm eval``, the
page's escaping and self-containment, its errors, and (where Chromium is installed) the page
in a browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, assert_clean_error, headless_chromium, run_charlm, run_cli
from torch import nn

from charlm.config import Config, ModelConfig
from charlm.data.vocab import Vocab
from charlm.model.network import CharRNN
from charlm.storage import checkpoint

HOSTILE = "</script><script>alert(1)</script><img src=x onerror=alert(3)>"
HOSTILE_RUN = "<img src=x onerror=alert(2)>&amp;<script>alert(4)<"  # a directory name: no '/'


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, as inspection itself runs: threads only wait on each other here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(cell: str, layers: int, vocab_size: int, hidden: int = 16, dropout: float = 0.0,
                 seed: int = 0, scale: float = 2.0) -> CharRNN:
    """Random weights, scaled up so that the gates saturate and the state carries."""
    torch.manual_seed(seed)
    model = CharRNN(vocab_size, ModelConfig(cell=cell, embed_size=8, hidden_size=hidden,
                                            num_layers=layers, dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def save_checkpoint(path: Path, model: CharRNN, vocab: Vocab, train_file: dict | None = None) -> Path:
    cfg = Config.from_dict({"model": vars(model.cfg)})
    ckpt = checkpoint.make_checkpoint(model, cfg, vocab, train_file=train_file or {},
                                      train_state={"step": 1})
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, ckpt)
    return path


# ------------------------------------------------------------------- activations and gates
def layer_module(model: CharRNN, k: int) -> nn.RNNBase:
    """Layer k of the model alone, as a fresh nn.RNN/LSTM/GRU with its weights."""
    cfg = model.cfg
    cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
    module = cls(cfg.embed_size if k == 0 else cfg.hidden_size, cfg.hidden_size, 1, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(module, f"{name}_l0").copy_(getattr(model.rnn, f"{name}_l{k}"))
    return module.eval()


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers,dropout", [(1, 0.0), (2, 0.0), (2, 0.3)])
def test_activations_and_gates_match_pytorch(cell, layers, dropout):
    from charlm.inspect.activations import CHUNK, trace

    model = random_model(cell, layers, 20, dropout=dropout)  # 2 layers + dropout: StackedRNN
    ids = torch.randint(0, 20, (CHUNK + 300,), generator=torch.Generator().manual_seed(1))
    got = trace(model, ids)  # two chunks: the state is carried across
    with torch.no_grad():
        logits, _ = model(ids[None])
        assert torch.allclose(got.logits, logits[0], atol=1e-5)
        x = model.embed(ids[None])
        for k in range(layers):
            module = layer_module(model, k)
            out, state = module(x)
            h_seq = out[0]
            assert torch.allclose(got.h[k], h_seq, atol=1e-5), (cell, k)
            H = model.cfg.hidden_size
            h_prev = torch.cat([torch.zeros(1, H), h_seq[:-1]])
            w_ih, w_hh, b_ih, b_hh = (getattr(module, f"{n}_l0") for n in
                                      ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            gi, gh = x[0] @ w_ih.T + b_ih, h_prev @ w_hh.T + b_hh
            if cell == "lstm":
                i, f, g, o = torch.sigmoid(gi + gh).chunk(4, 1)
                assert torch.allclose(got.gates[k]["input"], i, atol=1e-5)
                assert torch.allclose(got.gates[k]["forget"], f, atol=1e-5)
                assert torch.allclose(got.gates[k]["output"], o, atol=1e-5)
                # c: the final one is nn.LSTM's c_n, and h = o * tanh(c) at every step
                assert torch.allclose(got.c[k][-1], state[1][0, 0], atol=1e-5)
                assert torch.allclose(got.h[k], o * torch.tanh(got.c[k]), atol=1e-5)
                _, (_, c_mid) = module(x[:, :777])
                assert torch.allclose(got.c[k][776], c_mid[0, 0], atol=1e-5)
            elif cell == "gru":
                r, z = torch.sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H]).chunk(2, 1)
                assert torch.allclose(got.gates[k]["reset"], r, atol=1e-5)
                assert torch.allclose(got.gates[k]["update"], z, atol=1e-5)
            else:
                assert got.gates[k] == {} and got.c == []
            x = out


# --------------------------------------------------------------------------- features
def test_text_features():
    from charlm.inspect.features import FEATURES, text_features

    text = 'Hi "a (b [c])" d\nX9'
    f = {name: text_features(text)[:, j].tolist() for j, name in enumerate(FEATURES)}
    assert f["in_quotes"] == [0, 0, 0] + [1] * 11 + [0, 0, 0, 0, 0]
    assert f["bracket_depth"][text.index("(")] == 1 and f["bracket_depth"][text.index("c")] == 2
    assert f["bracket_depth"][text.index(")")] == 1 and f["in_brackets"][text.index(" d")] == 0
    assert f["line_position"][text.index("X")] == 0 and f["line_position"][text.index("d")] == 15
    assert f["after_newline"][text.index("X")] == 1 and sum(f["after_newline"]) == 2
    assert f["word_start"][:2] == [1, 0] and f["upper_case"][text.index("X")] == 1
    assert f["digit"][-1] == 1 and sum(f["digit"]) == 1


def test_feature_finder_finds_a_planted_unit():
    from charlm.inspect.features import FEATURES, Correlator, best_units, text_features

    text = SAMPLE_TEXT[:3000]
    feats = text_features(text)
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(len(text), 40))
    line = list(FEATURES).index("line_position")
    acts[:, 17] = np.tanh(feats[:, line] / 20) + rng.normal(scale=0.2, size=len(text))
    acts[:, 3] = -feats[:, list(FEATURES).index("upper_case")] + rng.normal(scale=0.5, size=len(text))
    corr = Correlator(40, len(FEATURES))
    for s in range(0, len(text), 700):  # in chunks, as over a long text
        corr.add(acts[s : s + 700], feats[s : s + 700])
    found = {name: (unit, r) for name, unit, r in best_units(corr.correlations())}
    assert found["line_position"][0] == 17
    r = np.corrcoef(acts[:, 17], feats[:, line])[0, 1]
    assert found["line_position"][1] == pytest.approx(r, abs=1e-9)
    assert found["line_position"][1] > 0.8
    assert found["upper_case"][0] == 3 and found["upper_case"][1] < -0.4
    assert "digit" not in found and "in_quotes" not in found  # constant over this text


# ------------------------------------------------------------ memory and bits per char
@pytest.fixture(scope="module")
def inspected():
    """A random GRU inspected over 1,400 characters of SAMPLE_TEXT."""
    from charlm.inspect.analysis import inspect_model

    text = SAMPLE_TEXT[:1400]
    vocab = Vocab.from_text(text)
    model = random_model("gru", 2, len(vocab), hidden=24, scale=1.5)
    return model, vocab, text, inspect_model(model, vocab, text)


def test_bits_per_char_is_the_evaluation_of_the_same_characters(inspected):
    from charlm.evaluate import evaluate_model

    model, vocab, text, r = inspected
    one_pass = evaluate_model(model, vocab, text, "fp32", streams=1, seq_len=10_000)
    assert r.document["bits_per_char"] == pytest.approx(one_pass.bpc, abs=1e-5)
    as_eval = evaluate_model(model, vocab, text, "fp32")  # charlm eval's 64 streams
    assert r.document["eval_bits_per_char"] == pytest.approx(as_eval.bpc, abs=1e-9)
    by_class = r.document["by_class"]
    assert sum(c["chars"] for c in by_class.values()) == len(text) - 1
    total = sum(c["chars"] * c["bits_per_char"] for c in by_class.values()) / (len(text) - 1)
    assert total == pytest.approx(r.document["bits_per_char"], abs=1e-9)


def test_memory_curve_unlimited_is_evaluation_and_k_cuts_the_context(inspected):
    from charlm.inspect import memory

    model, vocab, text, r = inspected
    ids = torch.as_tensor(vocab.encode(text), dtype=torch.long)
    where = memory.positions(len(ids))
    assert len(where) == r.document["memory_positions"] and where.min() > 512
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
        full = F.cross_entropy(logits[0], ids[1:], reduction="none").double().numpy()
        one = model(ids[torch.as_tensor(where - 1)][:, None])[0][:, -1]  # 1 character, zero state
        k1 = F.cross_entropy(one, ids[torch.as_tensor(where)]).item()
    points = {p["k"]: p["loss"] for p in r.document["memory"]}
    assert list(points) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, None]
    assert points[None] == pytest.approx(full[where - 1].mean(), abs=1e-5)
    assert points[1] == pytest.approx(k1, abs=1e-5)
    assert points[1] != pytest.approx(points[None], abs=1e-3)  # a cut changes the loss
    assert r.document["memory_gain_beyond_64"] == pytest.approx(points[64] - points[None])
    # A text shorter than every cut: each k reads all there is, so the curve is flat.
    short = ids[:300]
    flat = memory.curve(model, short, full[:299], memory.positions(300))
    long_cuts = {round(p["loss"], 6) for p in flat if p["k"] and p["k"] >= 512}
    assert long_cuts == {round(flat[-1]["loss"], 6)}


def test_surprise_top_predictions_and_gates(inspected):
    model, vocab, text, r = inspected
    d, page = r.document, r.page
    ids = torch.as_tensor(vocab.encode(text), dtype=torch.long)
    with torch.no_grad():
        probs = torch.softmax(model(ids[None])[0][0], 1)
    t = 100  # the predictions made after reading character t
    top = probs[t].topk(5)
    assert page["top_ids"][t] == top.indices.tolist()
    assert page["top_p"][t] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert page["bits"][t] == pytest.approx(-np.log2(probs[t, ids[t + 1]].item()), abs=0.01)
    worst = d["surprising"][0]
    assert len(d["surprising"]) == 20 and worst["bits"] == pytest.approx(max(page["bits"]), abs=0.01)
    assert text[worst["position"]] == worst["char"]
    pairs = {(k, g) for k in (0, 1) for g in ("reset", "update")}
    assert {(g["layer"], g["gate"]) for g in d["gates"]} == pairs
    for g in d["gates"]:
        assert len(g["left"]) == 24
        assert all(0 <= a + b <= 1 for a, b in zip(g["left"], g["right"], strict=True))
    assert [x["gate"] for x in d["gate_distribution"]] == ["update", "update"]
    assert sum(d["gate_distribution"][0]["counts"]) == 24 * len(text)
    assert {u["kind"] for u in d["units"]} == {"h"} and {u["layer"] for u in d["units"]} == {0, 1}


def test_rnn_has_no_gates_and_lstm_has_cells():
    from charlm.inspect.analysis import inspect_model
    from charlm.inspect.report import render

    text = SAMPLE_TEXT[:600]
    vocab = Vocab.from_text(text)
    r = inspect_model(random_model("rnn", 1, len(vocab)), vocab, text)
    assert r.document["gates"] == [] and r.document["gate_distribution"] == []
    assert "no gates" in render({**r.document, "run": "r", "checkpoint": "c", "text": "t",
                                 "cut": False, "unknown": 0}, r.page)
    r = inspect_model(random_model("lstm", 1, len(vocab)), vocab, text)
    assert {u["kind"] for u in r.document["units"]} == {"h", "c"}
    assert {g["gate"] for g in r.document["gates"]} == {"input", "forget", "output"}


# ------------------------------------------------------------------------------ the page
def data_block(page: str) -> dict:
    body = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(body.group(1))


def test_page_escapes_the_text_and_the_run(tmp_path):
    from charlm.inspect.analysis import inspect_checkpoint
    from charlm.inspect.report import write_page

    text = (HOSTILE + "\n" + SAMPLE_TEXT[:300]) * 3
    vocab = Vocab.from_text(text)
    model = random_model("lstm", 1, len(vocab))
    ckpt = save_checkpoint(tmp_path / HOSTILE_RUN / "best.pt", model, vocab)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    r = inspect_checkpoint(ckpt, tmp_path / "t.txt")
    assert r.document["run"] == HOSTILE_RUN
    write_page(tmp_path / "page.html", r.document, r.page, force=False)
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert len(re.findall(r"<script", page)) == 2  # the data block and the page's own script
    assert "<img" not in page and "onerror" not in page.split('<script id="data"')[0].replace(
        "&lt;img src=x onerror", "")  # only as escaped text
    assert "&lt;img src=x onerror=alert(2)&gt;&amp;amp;&lt;script&gt;" in page  # the run, as text
    assert data_block(page)["text"] == text  # the text itself, intact in the data
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp.split("style-src")[0]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched


def test_page_stays_small_for_a_long_text():
    from charlm.inspect.analysis import inspect_model
    from charlm.inspect.report import render

    text = (SAMPLE_TEXT * 3)[:12_000]
    vocab = Vocab.from_text(text)
    r = inspect_model(random_model("lstm", 2, len(vocab), hidden=48), vocab, text)
    page = render({**r.document, "run": "r", "checkpoint": "c", "text": "t", "cut": False,
                   "unknown": 0}, r.page)
    assert len(page.encode()) < 4_000_000
    assert len(r.page["text"]) == 10_000 and r.document["chars"] == 12_000
    assert r.page["unit_chars"] == 3_000 and len(r.page["bits"]) == 9_999


# ------------------------------------------------------------------------- the command
def test_command_end_to_end_json_page_and_eval(tiny_run, tmp_path):
    """The real console script: the page, --json, and bits/char against `charlm eval`."""
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT[:2500], encoding="utf-8")
    page = tmp_path / "page.html"
    proc = run_charlm("inspect", tiny_run, text, "-o", page, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    for key in ("chars", "bits_per_char", "by_class", "units", "gates", "memory"):
        assert key in d
    assert d["chars"] == 2500 and not d["cut"] and d["page"] == str(page)
    assert all({"layer", "kind", "index", "feature", "correlation"} <= set(u) for u in d["units"])
    assert all({"k", "loss"} <= set(p) for p in d["memory"])
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in html
    ev = run_charlm("eval", tiny_run, text, "--json", "--precision", "fp32")
    assert ev.returncode == 0, ev.stderr
    assert d["eval_bits_per_char"] == pytest.approx(json.loads(ev.stdout)["bits_per_char"], abs=1e-6)


def test_default_text_is_the_validation_split(tiny_run, tmp_path):
    from charlm.data.batching import load_corpus, split

    proc = run_cli("inspect", tiny_run, "-o", tmp_path / "p.html", "--json", "--chars", "300")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    ckpt = checkpoint.read(tiny_run / "best.pt")
    assert d["text"] == f"validation split of {ckpt['train_file']['path']}"
    vocab = checkpoint.vocab_of(ckpt)
    _, val = split(load_corpus(ckpt["train_file"]["path"], vocab).ids, 0.1)
    assert d["chars"] == 300 and d["cut"] and "--chars" in proc.stderr
    page = data_block((tmp_path / "p.html").read_text(encoding="utf-8"))
    assert page["text"] == vocab.decode(val[:300])


def test_command_errors(tiny_run, tmp_path):
    for chars in ("1", "200001"):
        proc = run_cli("inspect", tiny_run, "--chars", chars, "-o", tmp_path / "p.html")
        assert_clean_error(proc, "--chars")
        assert proc.returncode == 2 and not (tmp_path / "p.html").exists()
    mine = tmp_path / "notes.html"
    mine.write_text("my own notes", encoding="utf-8")
    proc = run_cli("inspect", tiny_run, "-o", mine)
    assert_clean_error(proc, "already exists", "--force")
    assert mine.read_text(encoding="utf-8") == "my own notes"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT[:200], encoding="utf-8")
    inspect_err = run_cli("inspect", bad, text, "-o", tmp_path / "p.html")
    eval_err = run_cli("eval", bad, text)
    assert_clean_error(inspect_err)
    assert inspect_err.stderr.strip() == eval_err.stderr.strip()
    proc = run_cli("inspect", tiny_run, tmp_path / "missing.txt", "-o", tmp_path / "p.html")
    assert_clean_error(proc, "missing.txt")
    proc = run_charlm("inspect", "-o", tmp_path / "p.html", cwd=tmp_path)  # no runs/ here
    assert_clean_error(proc, "no checkpoint found", "charlm inspect RUN_OR_CHECKPOINT")
    proc = run_cli("inspect", tiny_run, text, "-o", tmp_path / "no" / "p.html")
    assert_clean_error(proc, "does not exist")
    assert proc.returncode == 2


def test_export_without_training_text_needs_a_text(tmp_path):
    from charlm.errors import DataError
    from charlm.inspect.analysis import inspect_checkpoint

    vocab = Vocab.from_text(SAMPLE_TEXT)
    ckpt = save_checkpoint(tmp_path / "m.pt", random_model("gru", 1, len(vocab)), vocab)
    with pytest.raises(DataError, match="give a TEXT file"):
        inspect_checkpoint(ckpt)


# ------------------------------------------------------------------------------ browser
def test_page_in_a_browser(tmp_path):
    driver = headless_chromium(logs=True)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from charlm.inspect.analysis import inspect_model
    from charlm.inspect.report import write_page

    text = (HOSTILE + "\n" + SAMPLE_TEXT[:400]) * 2
    vocab = Vocab.from_text(text)
    r = inspect_model(random_model("lstm", 2, len(vocab)), vocab, text)
    doc = {**r.document, "run": HOSTILE_RUN, "checkpoint": HOSTILE, "text": HOSTILE, "cut": False,
           "unknown": 0}
    path = tmp_path / "page.html"
    write_page(path, doc, r.page, force=False)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
            window.__dialogs = [];
            for (const name of ['alert', 'confirm', 'prompt'])
              window[name] = (m) => window.__dialogs.push(m);
            window.__violations = [];
            document.addEventListener('securitypolicyviolation',
              (e) => window.__violations.push(e.violatedDirective));
        """})
        driver.get(path.resolve().as_uri())
        spans = driver.find_elements(By.CSS_SELECTOR, "#surprise span")
        assert len(spans) == len(text)
        assert driver.find_element(By.ID, "surprise").text.startswith("</script><script>")
        ActionChains(driver).move_to_element(spans[5]).perform()
        tip = driver.find_element(By.ID, "tip")
        assert tip.is_displayed() and "most likely next" in tip.text
        top = vocab.chars[r.page["top_ids"][4][0]]  # what the model expected after character 4
        shown = json.dumps({"\n": "\\n", "\t": "\\t", " ": "space"}.get(top, top))
        assert f'{shown}  {r.page["top_p"][4][0]:.3f}' in tip.text, tip.text
        cells = driver.find_element(By.ID, "cells")
        before = cells.get_attribute("data-unit")
        colors = [s.value_of_css_property("background-color") for s in
                  cells.find_elements(By.TAG_NAME, "span")[:60]]
        Select(driver.find_element(By.ID, "layer")).select_by_value("1")
        Select(driver.find_element(By.ID, "kind")).select_by_value("h")
        unit = driver.find_element(By.ID, "unit")
        unit.clear()
        unit.send_keys("7")
        driver.find_element(By.CSS_SELECTOR, "#pick button").click()
        assert cells.get_attribute("data-unit") == "1h:7" != before
        assert colors != [s.value_of_css_property("background-color") for s in
                          cells.find_elements(By.TAG_NAME, "span")[:60]]
        assert "layer 1 h[7]" in driver.find_element(By.ID, "unit-info").text
        assert driver.execute_script("return window.__dialogs") == []
        assert driver.execute_script("return window.__violations") == []
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        sent = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        requests = [m["params"]["request"]["url"] for m in sent
                    if m["method"] == "Network.requestWillBeSent"]
        assert all(u.startswith("file://") for u in requests), requests
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()
