"""``charlm serve``: the real command on a free port of 127.0.0.1, driven by the official
``openai`` client (completions, streaming, n, list prompts, stop, echo, seed) and by httpx for
every error; seeded texts equal alone, among many and with ``charlm sample``; the limits, the
API key, a disconnect freeing its slot, SIGTERM during streams, the page in headless Chromium.
Every wait is bounded in time."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import assert_clean_error, charlm_exe, headless_chromium, run_charlm, run_cli

pytest.importorskip("starlette", reason="charlm serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="charlm serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client (dev extra)")
openai = pytest.importorskip("openai", reason="the official client (dev extra)")

START_TIMEOUT = 90  # seconds for a server to import torch, load the model and bind


class Served:
    """A running ``charlm serve`` process: its URL and the lines of its stderr."""

    def __init__(self, *args, env=None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
        self.proc = subprocess.Popen([*charlm_exe(), "serve", *map(str, args), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=full_env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.url = self.wait_for(r"charlm serve: (http://127\.0\.0\.1:\d+)/", START_TIMEOUT).group(1)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}: {self.lines}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_run):
    s = Served(tiny_run)
    yield s
    assert s.stop() == 0, s.lines


@pytest.fixture(scope="module")
def guarded(tiny_run):
    """A server with a key and tight limits: one stream at a time, none waiting."""
    s = Served(tiny_run, "--max-streams", "1", "--max-queue", "0", "--max-tokens", "100000",
               "--max-n", "4", "--max-prompt-chars", "50", "--max-body-bytes", "2048",
               env={"CHARLM_API_KEY": "s3cret"})
    yield s
    assert s.stop() == 0, s.lines


def client(url: str, key: str = "none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


MODEL = "run"  # the tiny run's directory name


def _line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


# --------------------------------------------------------------------------- the API
def test_plain_streamed_n_list_prompt_and_usage(server):
    c = client(server.url)
    r = c.completions.create(model=MODEL, prompt="All:", max_tokens=30, seed=1, temperature=0.9)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and len(r.choices[0].text) == 30
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 30, 34)
    chunks = list(c.completions.create(model=MODEL, prompt="All:", max_tokens=30, seed=1,
                                       temperature=0.9, stream=True))
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    many = c.completions.create(model=MODEL, prompt=["All:", "First"], n=3, max_tokens=20, seed=2)
    assert [ch.index for ch in many.choices] == list(range(6))
    texts = [ch.text for ch in many.choices]
    assert len(set(texts[:3])) == 3 and texts[:3] != texts[3:]
    # each prompt's choices are the rows of charlm sample --num-samples 3 with that seed
    alone = c.completions.create(model=MODEL, prompt="First", n=3, max_tokens=20, seed=2)
    assert [ch.text for ch in alone.choices] == texts[3:]


def test_stop_echo_and_streamed_echo(server):
    c = client(server.url)
    full = c.completions.create(model=MODEL, prompt="All:", max_tokens=200, seed=3,
                                temperature=1.0).choices[0].text
    stop = next(ch for ch in full[5:] if ch.isalpha())  # a letter that occurs after a few chars
    cut = full.index(stop)
    r = c.completions.create(model=MODEL, prompt="All:", max_tokens=200, seed=3, temperature=1.0,
                             stop=[stop, "zzzz"], echo=True)
    # OpenAI's rule: the text ends before the stop text, which is not returned
    assert r.choices[0].text == "All:" + full[:cut]
    assert r.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(model=MODEL, prompt="All:", max_tokens=200, seed=3,
                                         temperature=1.0, stop=stop, echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == "All:" + full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    # a stop text of several characters is held back while it might be starting
    two = full[cut:cut + 2]
    r2 = c.completions.create(model=MODEL, prompt="All:", max_tokens=200, seed=3, temperature=1.0,
                              stop=two, stream=True)
    assert "".join(ch.choices[0].text for ch in r2) == full[:full.index(two)]


def _sample(tiny_run, prompt, length, seed, temperature, top_k=0, top_p=1.0) -> str:
    proc = run_charlm("sample", "-c", tiny_run / "best.pt", "--seed", prompt, "-n", length,
                      "--random-seed", seed, "-t", temperature, "--top-k", top_k,
                      "--top-p", top_p, "--no-echo")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_seed_alone_among_many_and_equal_to_charlm_sample(server, tiny_run):
    ask = dict(model=MODEL, prompt="First Citizen:", max_tokens=80, seed=12345, temperature=0.9,
               top_p=0.95, extra_body={"top_k": 12})
    alone = client(server.url).completions.create(**ask).choices[0].text

    def one(i: int) -> str:
        c = client(server.url)
        if i == 7:
            time.sleep(0.05)  # joins a batch already running
            return c.completions.create(**ask).choices[0].text
        if i % 2:  # others stream, with other seeds and options, of other lengths
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model=MODEL, prompt="All:" * (i % 3), max_tokens=40 + 7 * i, seed=i,
                temperature=0.3 + i / 20, stream=True))
        return c.completions.create(model=MODEL, prompt="Speak", max_tokens=150, n=2,
                                    temperature=1.2, top_p=0.5 + i / 50).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20), timeout=120))
    assert results[7] == alone
    assert _sample(tiny_run, "First Citizen:", 80, 12345, 0.9, 12, 0.95) == _line(alone)


def test_models_and_health(server):
    models = client(server.url).models.list().data
    assert [m.id for m in models] == [MODEL]
    m = models[0].model_dump()
    assert m["object"] == "model" and m["owned_by"] == "charlm"
    assert m["cell"] == "lstm" and m["hidden_size"] == 32 and m["num_layers"] == 1
    assert m["vocab_size"] == 33 and m["train_file"] == "input.txt"
    assert isinstance(m["best_val_loss"], float) and m["parameters"] > 0
    one = httpx.get(server.url + f"/v1/models/{MODEL}", timeout=10).json()
    assert one["id"] == MODEL
    h = httpx.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["models"] == [MODEL]
    assert any(re.search(r'"GET /health HTTP/1.1" 200 \d+ chars', line) for line in server.lines)


def _error(response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    for needle in needles:
        assert needle in body["error"]["message"], body
    return body["error"]


@pytest.mark.parametrize(("body", "status", "needle", "param"), [
    (b"{bad json", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    (b'{"prompt": "a", "max_tokens": NaN}', 400, "not valid JSON", None),
    (b'\xff\xfe{}', 400, "not valid JSON", None),
    (json.dumps({"model": "nope", "prompt": "a"}).encode(), 404, "'nope' is not served", "model"),
    (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400, "prompt must be", "prompt"),
    (json.dumps({"model": MODEL, "prompt": [1, 2]}).encode(), 400, "not token ids", "prompt"),
    (json.dumps({"model": MODEL, "max_tokens": "10"}).encode(), 400, "an integer", "max_tokens"),
    (json.dumps({"model": MODEL, "max_tokens": 10**9}).encode(), 400, "must be in", "max_tokens"),
    (json.dumps({"model": MODEL, "max_tokens": True}).encode(), 400, "an integer", "max_tokens"),
    (json.dumps({"model": MODEL, "temperature": -1}).encode(), 400, "temperature", "temperature"),
    (json.dumps({"model": MODEL, "top_p": 0}).encode(), 400, "top_p", "top_p"),
    (json.dumps({"model": MODEL, "n": 1000}).encode(), 400, "n must be in", "n"),
    (json.dumps({"model": MODEL, "prompt": ["a"] * 9, "n": 2}).encode(), 400, "per request", "n"),
    (json.dumps({"model": MODEL, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "at most 4", "stop"),
    (json.dumps({"model": MODEL, "stop": [""]}).encode(), 400, "1 to 64", "stop"),
    (json.dumps({"model": MODEL, "stop": 3}).encode(), 400, "stop must be", "stop"),
    (json.dumps({"model": MODEL, "seed": -1}).encode(), 400, "seed", "seed"),
    (json.dumps({"model": MODEL, "stream": "yes"}).encode(), 400, "true or false", "stream"),
    (json.dumps({"model": MODEL, "prompt": "x" * 9000}).encode(), 400, "at most 8,192", "prompt"),
    (json.dumps({"model": MODEL, "logprobs": 5}).encode(), 400, "not supported", "logprobs"),
], ids=lambda v: v.decode("latin-1")[:40] if isinstance(v, bytes) else None)
def test_bad_requests_are_openai_json_errors(server, body, status, needle, param):
    r = httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert _error(r, status, needle)["param"] == param


def test_unknown_characters_named_or_dropped_and_unknown_routes(server):
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "All\u2603:<b>", "max_tokens": 5})
    _error(r, 400, "'\u2603'", "drop_unknown")
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "All\u2603:", "max_tokens": 5, "seed": 4,
                         "drop_unknown": True, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("All:")
    _error(httpx.get(server.url + "/v1/nothing", timeout=10), 404, "no such route")
    _error(httpx.get(server.url + "/v1/completions", timeout=10), 405, "method")
    assert not any("Traceback" in line for line in server.lines), server.lines


def test_a_name_rebound_to_127_0_0_1_is_refused(server):
    port = server.url.rsplit(":", 1)[1]
    _error(httpx.get(server.url + "/v1/models", headers={"Host": f"evil.example:{port}"},
                     timeout=10), 400, "127.0.0.1")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(server.url + "/health", headers={"Host": host}, timeout=10).status_code == 200


def test_every_interface_is_said_and_names_are_not_checked(tiny_run):
    s = Served(tiny_run, "--host", "0.0.0.0", "--quiet")
    try:
        s.wait_for(r"warning: listening on every interface .*--api-key", 10)
        port = s.url.rsplit(":", 1)[1]
        r = httpx.get(s.url + "/health", headers={"Host": f"box.example:{port}"}, timeout=10)
        assert r.status_code == 200
    finally:
        assert s.stop() == 0, s.lines


def test_time_limit_is_a_503_or_an_error_event(tiny_run):
    s = Served(tiny_run, "--timeout", "0.5", "--max-tokens", "10000000", "--quiet")
    try:
        ask = {"prompt": "All", "max_tokens": 10000000}
        started = time.monotonic()
        _error(httpx.post(s.url + "/v1/completions", json=ask, timeout=30), 503, "--timeout")
        assert time.monotonic() - started < 10
        with httpx.stream("POST", s.url + "/v1/completions", json={**ask, "stream": True},
                          timeout=30) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert any('"code":"timeout"' in line for line in lines), lines[-3:]
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    finally:
        assert s.stop() == 0, s.lines


def test_key_body_size_and_busy(guarded):
    url = guarded.url
    _error(httpx.get(url + "/v1/models", timeout=10), 401, "API key")
    _error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10),
           401, "API key")
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
    assert client(url, "s3cret").completions.create(model=MODEL, prompt="All", max_tokens=3).choices
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # no key for health
    auth = {"Authorization": "Bearer s3cret"}
    _error(httpx.post(url + "/v1/completions", content=b"x" * 5000, headers=auth, timeout=10),
           413, "2,048 bytes")

    def chunked():  # no Content-Length: the bound holds while the body is read
        for _ in range(10):
            yield b"x" * 500

    _error(httpx.post(url + "/v1/completions", content=chunked(), headers=auth, timeout=10),
           413, "larger than")
    _error(httpx.post(url + "/v1/completions", json={"prompt": "x" * 51}, headers=auth,
                      timeout=10), 400, "at most 50")
    # One stream at a time and none waiting: a second request meanwhile is 429.
    with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=30,
                      json={"prompt": "All", "max_tokens": 50000, "stream": True}) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert next(lines).startswith("data: ")
        _error(httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2},
                          headers=auth, timeout=10), 429, "busy")
    # The first client went away mid-stream: its slot is free at once.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(url + "/health", timeout=10).json()["streams"][MODEL]["running"] == 0:
            break
        time.sleep(0.05)
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["streams"][MODEL] == {"running": 0, "waiting": 0}
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=auth,
                   timeout=10)
    assert r.status_code == 200


def test_disconnect_of_a_plain_request_frees_its_slot(guarded):
    auth = {"Authorization": "Bearer s3cret"}
    host, port = guarded.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "All", "max_tokens": 90000}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nAuthorization: " + auth["Authorization"]
                + f"\r\nContent-Length: {len(body)}\r\n\r\n")
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 10
        while httpx.get(guarded.url + "/health", timeout=10).json()["streams"][MODEL]["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    started = time.monotonic()
    while httpx.get(guarded.url + "/health", timeout=10).json()["streams"][MODEL]["running"]:
        assert time.monotonic() - started < 5, "the slot was not freed"
        time.sleep(0.02)


def test_sigterm_finishes_streams_in_flight_and_exits_0(tiny_run):
    s = Served(tiny_run, "--quiet")
    try:
        texts = []
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"prompt": "All", "max_tokens": 3000, "stream": True}) as r:
            events = r.iter_lines()
            first = next(events)
            s.proc.send_signal(signal.SIGTERM)
            texts.append(first)
            texts.extend(line for line in events if line)
        assert texts[-1] == "data: [DONE]"
        generated = "".join(json.loads(line[6:])["choices"][0]["text"] for line in texts[:-1])
        assert len(generated) == 3000  # the stream in flight was finished, not cut
        assert s.proc.wait(30) == 0
        assert not any("Traceback" in line or "INFO:" in line for line in s.lines), s.lines
    finally:
        s.stop()


def test_exports_are_served_by_name(exports, server):
    s = Served("--model", f"st={exports['safetensors']}", "--model", f"ox={exports['onnx']}")
    try:
        c = client(s.url)
        assert [m.id for m in c.models.list().data] == ["st", "ox"]
        ask = dict(prompt="All:", max_tokens=40, seed=6, temperature=0.9)
        pt = client(server.url).completions.create(model=MODEL, **ask).choices[0].text
        assert c.completions.create(model="st", **ask).choices[0].text == pt
        greedy = dict(prompt="All:", max_tokens=40, temperature=0)
        assert c.completions.create(model="ox", **greedy).choices[0].text == \
            c.completions.create(model="st", **greedy).choices[0].text
    finally:
        assert s.stop() == 0, s.lines


# ----------------------------------------------------------------------- the command's errors
def test_without_the_extra_the_command_is_a_one_line_error(monkeypatch, tiny_run):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    proc = run_cli("serve", tiny_run)
    assert_clean_error(proc, 'pip install "charlm[serve]"')
    assert proc.returncode == 1


def test_bad_options_and_busy_port_are_one_line_errors(tiny_run, tmp_path):
    assert_clean_error(run_cli("serve", tiny_run, "--model", "nameonly"), "NAME=PATH")
    assert_clean_error(run_cli("serve", tiny_run, "--model", "a b=x"), "model name")
    assert_clean_error(run_cli("serve", tiny_run, "--max-n", "0"), "--max-n")
    assert_clean_error(run_cli("serve", tiny_run, "--port", "70000"), "--port")
    assert_clean_error(run_cli("serve", tmp_path / "missing.pt"), "missing.pt")
    proc = run_charlm("serve", cwd=tmp_path)  # no runs/ here
    assert_clean_error(proc, "no checkpoint found under runs/", "charlm serve runs/NAME")
    proc = run_cli("serve", tiny_run, "--model", f"run={tiny_run}")
    assert_clean_error(proc, "two models are named 'run'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proc = run_cli("serve", tiny_run, "--port", taken.getsockname()[1])
    assert_clean_error(proc, "cannot listen on 127.0.0.1", "--port")


# ---------------------------------------------------------------------------- the page


def test_page_streams_generated_text_after_the_prompt(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "connect-src 'self'" in page.text
    assert "<script>" in page.text and '"id":"run"' in page.text
    driver = headless_chromium()
    from selenium.webdriver.common.by import By

    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        find = lambda i: driver.find_element(By.ID, i)  # noqa: E731
        deadline = time.monotonic() + 20
        while "lstm" not in find("card").text:  # the model card
            assert time.monotonic() < deadline, find("card").text
            time.sleep(0.05)
        find("prompt").send_keys("All:")
        for name, value in (("length", "60"), ("seed", "9")):
            find(name).clear()
            find(name).send_keys(value)
        find("generate").click()
        deadline = time.monotonic() + 30
        while "characters in" not in find("status").text:
            assert time.monotonic() < deadline and "error" not in find("status").text, \
                find("status").text
            time.sleep(0.05)
        shown = driver.execute_script("return document.getElementById('output').textContent")
        assert shown.startswith("All:") and len(shown) == len("All:") + 60
        generated = shown[len("All:"):]
        r = httpx.post(server.url + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "All:", "max_tokens": 60, "seed": 9,
            "temperature": 0.8})
        assert r.json()["choices"][0]["text"] == generated
    finally:
        driver.quit()


# -------------------------------------------------------------------------- the batcher
def test_a_stream_holds_back_what_may_start_a_stop_text():
    from charlm.serving.batcher import Stream

    s = Stream([0], 1, 100, 1.0, 0, 1.0, ["abc", "xy"], emit=None)
    out = [s.take(c) for c in "zaxab"]
    assert out == [("z", None), ("", None), ("a", None), ("x", None), ("", None)]
    assert s.take("d") == ("abd", None)
    assert [s.take(c) for c in "aabc"] == [("", None), ("a", None), ("", None), ("", "stop")]
    t = Stream([0], 1, 3, 1.0, 0, 1.0, ["xyz"], emit=None)
    assert [t.take(c) for c in "axy"] == [("a", None), ("", None), ("xy", "length")]


def test_draws_are_per_stream_and_batch_independent():
    import numpy as np

    from charlm.sampling.draws import stream_keys, uniforms

    keys = stream_keys(7, 5)
    assert len(set(keys.tolist())) == 5 and (stream_keys(7, 3, first=2) == keys[2:]).all()
    u = uniforms(keys, np.arange(5))
    assert ((0 <= u) & (u < 1)).all()
    assert [uniforms(keys[i:i + 1], i)[0] for i in range(5)] == u.tolist()
    assert not np.array_equal(uniforms(stream_keys(8, 5), 0), uniforms(keys, 0))
