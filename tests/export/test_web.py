"""`charlm export --format html`: one web page that runs the model in the browser (issue 28).

The pages are checked in headless Chromium (Debian's chromium + chromedriver, through
selenium): the next-character probabilities and greedy text against PyTorch for RNN, LSTM and
GRU at 1 and 2 layers, fp16/int8 against PyTorch on the same rounded weights, the UI streaming
after a click, no network request, hostile strings shown as text, astral characters. One
browser for the whole module; the models are tiny and random (weights scaled up so that the
distributions are peaked and greedy text has no near-ties).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, headless_chromium, run_charlm, run_cli

from charlm.config import Config
from charlm.data.vocab import Vocab
from charlm.export import web as web_export
from charlm.model.network import build_model
from charlm.storage import checkpoint

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
HOSTILE = "</script><script>alert(1)</script>"
HOSTILE_RUN = "<img src=x onerror=alert(2)>&amp;<b>run"  # a directory name: no '/'
ASTRAL = "春眠不覺曉 😀🎉 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 é\n"


def make_checkpoint(path: Path, cell: str, layers: int, text: str = TEXT, hidden: int = 24,
                    embed: int = 8, scale: float = 2.5, seed: int = 0, train_file: str = "input.txt",
                    dropout: float = 0.0) -> Path:
    """A random model of ``cell`` saved as a charlm checkpoint (weights scaled by ``scale``)."""
    torch.manual_seed(seed)
    vocab = Vocab.from_text(text)
    cfg = Config.from_dict({"model": {"cell": cell, "embed_size": embed, "hidden_size": hidden,
                                      "num_layers": layers, "dropout": dropout}})
    model = build_model(len(vocab), cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    ckpt = checkpoint.make_checkpoint(
        model, cfg, vocab, train_file={"name": train_file, "size": len(text), "sha256": None},
        train_state={"best_val_loss": 1.2345, "step": 1})
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, ckpt)
    return path


def torch_model(ckpt_path: Path, quantize: str = "none"):
    """The checkpoint's model with the weights the page computes with."""
    ckpt = checkpoint.read(ckpt_path)
    model = checkpoint.model_of(ckpt)
    model.load_state_dict(web_export.rounded_state_dict(model.state_dict(), quantize))
    return model, checkpoint.vocab_of(ckpt)


@torch.no_grad()
def torch_probs(model, vocab, prompt: str) -> list[float]:
    ids = torch.tensor([vocab.encode(prompt).tolist()])
    logits, _ = model(ids)
    return logits[0, -1].double().softmax(-1).tolist()


@torch.no_grad()
def torch_greedy(model, vocab, prompt: str, length: int) -> str:
    logits, state = model(torch.tensor([vocab.encode(prompt).tolist()]))
    out = []
    for _ in range(length):
        nxt = int(logits[0, -1].argmax())
        out.append(vocab.chars[nxt])
        logits, state = model(torch.tensor([[nxt]]), state)
    return "".join(out)


def export(ckpt: Path, out: Path, quantize: str = "none") -> Path:
    web_export.export_html(ckpt, out, force=True, quantize=quantize, measure=False)
    return out


# ----------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium("--allow-file-access-from-files", logs=True)
    driver.set_script_timeout(60)
    # Every page: record alert()/confirm()/prompt() calls instead of showing a dialog.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__dialogs = [];
        for (const name of ['alert', 'confirm', 'prompt']) {
          window[name] = (m) => { window.__dialogs.push(name + ':' + m); };
        }
        window.__violations = [];
        document.addEventListener('securitypolicyviolation',
          (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
    """})
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> None:
    driver.get_log("performance")  # drop what came before
    driver.get(path.resolve().as_uri())
    call(driver, "card", None)  # the model is read


def call(driver, method: str, *args):
    """window.charlm[method](*args), awaited."""
    result = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const [method, args] = [arguments[0], arguments[1]];
        window.charlm[method](...args).then(
          (v) => done({ok: v}), (e) => done({error: String(e && e.message || e)}));
    """, method, [a for a in args if a is not None])
    assert "error" not in result, result["error"]
    return result["ok"]


# ----------------------------------------------------------------------------- exactness
SEED = "Before we "


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_fp32_page_matches_pytorch(browser, tmp_path, cell, layers):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", cell, layers, dropout=0.1 * (layers > 1))
    page = export(ckpt, tmp_path / "m.html", "none")
    open_page(browser, page)
    model, vocab = torch_model(ckpt)
    got = call(browser, "probs", SEED)
    assert [c for c, _ in got] == list(vocab.chars)
    want = torch_probs(model, vocab, SEED)
    assert max(abs(p - w) for (_, p), w in zip(got, want, strict=True)) < 1e-5
    text = call(browser, "generate", SEED, {"length": 200, "temperature": 0})
    assert text == torch_greedy(model, vocab, SEED, 200)


@pytest.mark.parametrize("quantize,cell", [("fp16", "lstm"), ("int8", "gru"), ("int8", "rnn")])
def test_rounded_weights_greedy_text_matches_pytorch_on_the_same_weights(browser, tmp_path, quantize,
                                                                         cell):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", cell, 2, seed=3)
    page = export(ckpt, tmp_path / "m.html", quantize)
    open_page(browser, page)
    model, vocab = torch_model(ckpt, quantize)
    got = call(browser, "probs", SEED)
    want = torch_probs(model, vocab, SEED)
    assert max(abs(p - w) for (_, p), w in zip(got, want, strict=True)) < 1e-5
    text = call(browser, "generate", SEED, {"length": 200, "temperature": 0})
    assert text == torch_greedy(model, vocab, SEED, 200)
    if quantize == "int8":  # the rounding is real: the fp32 weights give other probabilities
        exact, _ = torch_model(ckpt, "none")
        fp32 = torch_probs(exact, vocab, SEED)
        assert max(abs(p - w) for (_, p), w in zip(got, fp32, strict=True)) > 1e-5


def test_sampler_seed_stop_and_options(browser, tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "lstm", 1, scale=1.0)
    open_page(browser, export(ckpt, tmp_path / "m.html", "fp16"))
    opts = {"length": 300, "temperature": 1.0, "top_k": 5, "top_p": 0.9, "seed": 7}
    a = call(browser, "generate", "All", opts)
    assert a == call(browser, "generate", "All", opts)  # same seed, same text
    assert len(a) == 300 and a != call(browser, "generate", "All", {**opts, "seed": 8})
    stop = a[40:42]
    cut = call(browser, "generate", "All", {**opts, "stop": [stop]})
    assert cut.endswith(stop) and stop not in cut[:-1] and a.startswith(cut)
    result = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        window.charlm.generate('All', {top_p: 0}).then(() => done('resolved'), (e) => done(e.message));
    """)
    assert "top_p must be in (0, 1]" in result
    result = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        window.charlm.probs('Q~').then(() => done('resolved'), (e) => done(e.message));
    """)
    assert "not in the model's vocabulary" in result and '"~"' in result


def test_astral_cjk_and_emoji_vocabulary(browser, tmp_path):
    text = ASTRAL * 3 + TEXT
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "gru", 1, text=text)
    open_page(browser, export(ckpt, tmp_path / "m.html", "none"))
    model, vocab = torch_model(ckpt)
    assert any(ord(c) > 0xFFFF for c in vocab.chars)
    prompt = "😀𝔘春"
    got = call(browser, "probs", prompt)
    assert [c for c, _ in got] == list(vocab.chars)  # whole code points, not UTF-16 halves
    want = torch_probs(model, vocab, prompt)
    assert max(abs(p - w) for (_, p), w in zip(got, want, strict=True)) < 1e-5
    greedy = call(browser, "generate", prompt, {"length": 120, "temperature": 0})
    assert greedy == torch_greedy(model, vocab, prompt, 120)
    sampled = call(browser, "generate", prompt, {"length": 150, "temperature": 2.0, "seed": 1})
    assert len(sampled) == 150 and set(sampled) <= set(vocab.chars)  # 150 code points


# ------------------------------------------------------------------- UI, network, escaping
def test_ui_streams_after_a_click_and_makes_no_request(browser, tmp_path):
    from selenium.webdriver.common.by import By

    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "lstm", 1)
    page = export(ckpt, tmp_path / "m.html", "fp16")
    html = page.read_text(encoding="utf-8")
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    assert "connect-src 'none'" in csp and "default-src 'none'" in csp
    open_page(browser, page)
    card = browser.find_element(By.ID, "card").text
    assert "lstm" in card and "input.txt" in card
    model, vocab = torch_model(ckpt, "fp16")
    find = lambda i: browser.find_element(By.ID, i)  # noqa: E731
    find("prompt").send_keys("All")
    for name, value in (("temperature", "0"), ("length", "5000000")):
        find(name).clear()
        find(name).send_keys(value)
    find("generate").click()
    progress = "return [document.getElementById('output-text').textContent.length, " \
               "!document.getElementById('stop').disabled]"
    seen = []
    for _ in range(200):  # partial text appears while it is still generating
        seen.append(browser.execute_script(progress))
        if seen[-1][0] > 0 and seen[-1][1]:
            break
        time.sleep(0.02)
    assert seen[-1][0] > 0 and seen[-1][1], seen
    time.sleep(0.1)
    assert browser.execute_script(progress)[0] > seen[-1][0]  # ... and keeps streaming
    assert find("generate").get_attribute("disabled")
    find("stop").click()
    for _ in range(200):
        if find("generate").is_enabled():
            break
        time.sleep(0.02)
    assert "stopped" in find("status").text
    shown = browser.execute_script("return document.getElementById('output-text').textContent")
    assert 0 < len(shown) < 5000000
    assert shown[:300] == torch_greedy(model, vocab, "All", 300)
    # No request left the page: only the page itself was loaded, no resource was fetched, and a
    # deliberate fetch is refused by the Content-Security-Policy.
    requests = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requests
            if m["method"] == "Network.requestWillBeSent"]
    assert all(u == page.resolve().as_uri() for u in urls), urls
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    outcome = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('http://127.0.0.1:9/weights.bin').then(() => done('fetched'), () => done('refused'));
    """)
    assert outcome == "refused"
    assert any("connect-src" in v for v in browser.execute_script("return window.__violations"))


def test_hostile_strings_are_shown_as_text_and_run_nothing(browser, tmp_path):
    from selenium.webdriver.common.by import By

    run = tmp_path / HOSTILE_RUN
    make_checkpoint(run / "best.pt", "lstm", 1, text=(HOSTILE + "\n") * 5,
                    train_file=HOSTILE + ".txt")
    proc = run_charlm("export", run, "--format", "html", "--quantize", "none")
    assert proc.returncode == 0, proc.stderr
    page = run / "best.html"
    html = page.read_text(encoding="utf-8")
    assert HOSTILE not in html and "<img src=x" not in html
    open_page(browser, page)
    assert browser.execute_script("return window.__dialogs") == []
    kinds = browser.execute_script("return [...document.scripts].map((s) => s.type || 'js')")
    assert kinds == ["application/json", "application/octet-stream", "js", "js"]
    assert browser.execute_script("return document.querySelectorAll('img, b').length") == 0
    assert browser.title == "charlm: " + HOSTILE_RUN
    assert browser.find_element(By.ID, "title").text == "charlm: " + HOSTILE_RUN
    card = call(browser, "card")
    assert card["train_file"] == HOSTILE + ".txt" and card["run"] == HOSTILE_RUN
    assert HOSTILE + ".txt" in browser.find_element(By.ID, "card").text
    model, vocab = torch_model(run / "best.pt")
    find = lambda i: browser.find_element(By.ID, i)  # noqa: E731
    find("prompt").send_keys("</script><scr")
    for name, value in (("temperature", "0"), ("length", "80")):
        find(name).clear()
        find(name).send_keys(value)
    find("generate").click()
    for _ in range(200):
        if "characters" in find("status").text:
            break
        time.sleep(0.02)
    shown = browser.execute_script("return document.getElementById('output-text').textContent")
    assert shown == torch_greedy(model, vocab, "</script><scr", 80)
    assert browser.execute_script("return document.scripts.length") == 4
    assert browser.execute_script("return window.__dialogs") == []


# ------------------------------------------------------------------------ without a browser
def test_page_holds_escaped_data_and_the_model_card(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "gru", 1, text=HOSTILE + ASTRAL,
                           train_file=HOSTILE + ".txt")
    html = export(ckpt, tmp_path / "m.html", "int8").read_text(encoding="utf-8")
    assert HOSTILE not in html
    card = web_export.describe_page(tmp_path / "m.html")
    assert card["train_file"] == HOSTILE + ".txt" and card["weights"].startswith("int8")
    assert html.count("<script") == 4 and html.count("</script>") == 4


def test_a_checkpoint_never_evaluated_exports(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "last.pt", "gru", 1)
    raw = torch.load(ckpt, weights_only=True)
    raw["train_state"]["best_val_loss"] = float("inf")  # interrupted before its first evaluation
    checkpoint.save(ckpt, raw)
    proc = run_cli("export", ckpt, "--format", "html")
    assert proc.returncode == 0, proc.stderr
    assert web_export.describe_page(tmp_path / "run" / "last.html")["best_val_loss"] is None


def test_weights_beyond_fp16_are_a_one_line_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "rnn", 1)
    raw = torch.load(ckpt, weights_only=True)
    raw["model"]["head.weight"][0, 0] = 1e6
    checkpoint.save(ckpt, raw)
    proc = run_cli("export", ckpt, "--format", "html", "-o", tmp_path / "m.html")
    assert_clean_error(proc, "head.weight", "fp16's range", "--quantize int8")
    assert not (tmp_path / "m.html").exists()
    assert run_cli("export", ckpt, "--format", "html", "--quantize", "int8", "-o",
                   tmp_path / "m.html").returncode == 0


def test_size_bound_is_a_one_line_error(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "lstm", 1)
    params = sum(t.numel() for t in checkpoint.read(ckpt)["model"].values())
    monkeypatch.setattr(web_export, "MAX_PARAMETERS", params - 1)
    proc = run_cli("export", ckpt, "--format", "html", "-o", tmp_path / "m.html")
    assert_clean_error(proc, f"{params:,} parameters", f"limit {params - 1:,}")
    assert proc.returncode == 1 and not (tmp_path / "m.html").exists()
    assert web_export.MAX_PARAMETERS < 25_000_000 and web_export.MAX_PAGE_BYTES <= 100_000_000


def test_quantize_sizes_and_loss_change_reported(tmp_path):
    from charlm.data.text import resolve_source

    text = tmp_path / "input.txt"
    text.write_text(TEXT * 40, encoding="utf-8")
    tiny_run = tmp_path / "run"
    ckpt = make_checkpoint(tiny_run / "best.pt", "gru", 1, text=TEXT, scale=1.0)
    raw = torch.load(ckpt, weights_only=True)
    raw["train_file"] = {**resolve_source(text).describe(), "path": str(text)}
    checkpoint.save(ckpt, raw)
    sizes = {}
    for q in ("none", "fp16", "int8"):
        out = tmp_path / f"{q}.html"
        proc = run_cli("export", tiny_run, "--format", "html", "--quantize", q, "-o", out)
        assert proc.returncode == 0, proc.stderr
        sizes[q] = out.stat().st_size
        assert f"{sizes[q]:,} bytes" in proc.stdout
        if q == "int8":  # measured on the training text's validation split
            assert re.search(r"[+-]\d\.\d{4} from the checkpoint's \d\.\d{4}", proc.stdout), proc.stdout
    assert sizes["int8"] < sizes["fp16"] < sizes["none"]
    text.write_text(TEXT * 41, encoding="utf-8")  # not the text it was trained on any more
    proc = run_cli("export", tiny_run, "--format", "html", "--quantize", "int8", "-o", out, "--force")
    assert proc.returncode == 0 and "not measured: the training text has changed" in proc.stdout
    assert_clean_error(run_cli("export", tiny_run, "--format", "html", "--quantize", "int4",
                               "-o", tmp_path / "x.html"), "--quantize")
    assert_clean_error(run_cli("export", tiny_run, "--format", "onnx", "--quantize", "int8"),
                       "--quantize applies to --format html only")


def test_a_page_is_not_a_checkpoint(tmp_path):
    import charlm
    from charlm.errors import CheckpointError

    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "rnn", 1)
    page = export(ckpt, tmp_path / "m.html", "fp16")
    with pytest.raises(CheckpointError, match="charlm web page .*rnn 24 x 1.*not a checkpoint"):
        charlm.load(page)
    proc = run_cli("info", page)
    assert_clean_error(proc, "is a charlm web page (rnn 24 x 1", "fp16 weights")
    other = tmp_path / "other.html"
    other.write_text("<html>hello</html>")
    assert_clean_error(run_cli("info", other), "is an HTML file, not a charlm checkpoint")
