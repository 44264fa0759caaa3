"""Load on ``charlm serve``: 1, 8, 32 and 128 concurrent streaming clients.

Starts the real ``charlm serve`` on a free port of 127.0.0.1 (the model of ``--checkpoint``,
or, by default, one trained here with ``charlm train --config configs/cpu.toml --max-steps
50``), then for each number of clients runs that many streaming completions at once (httpx,
asyncio, in this process) and reports:

* aggregate characters/s: all characters received / wall time of the round,
* time to first character (p50, p99): from sending the request to its first generated text,
* per-character latency (p50, p99): the gap between successive chunks a client receives,
  charged to every character of the later chunk (a chunk holds the characters generated
  since the client last read, so this is the delay each character waited).

    python benchmarks/serve_load.py [--checkpoint runs/x/best.pt] [--chars 1000] [--clients 1,8,32,128]

The clients share the machine with the server: on 2 cores, their own parsing is part of the
cost measured (as it would be for clients on the same host).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def charlm() -> list[str]:
    exe = shutil.which("charlm")
    return [exe] if exe else [sys.executable, "-m", "charlm"]


def train_checkpoint(work: Path) -> Path:
    out = work / "cpu-run"
    subprocess.run([*charlm(), "train", "--config", str(ROOT / "configs" / "cpu.toml"),
                    "--max-steps", "50", "--out", str(out), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "best.pt"


class Server:
    def __init__(self, checkpoint: Path, extra: list[str]):
        self.proc = subprocess.Popen([*charlm(), "serve", str(checkpoint), "--port", "0", "--quiet",
                                      *extra], stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = [m for line in list(self.lines) if (m := re.search(r"(http://[\d.:]+)/", line))]
            if found:
                self.url = found[0].group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit("the server did not start: " + "\n".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


async def one_client(http: httpx.AsyncClient, url: str, model: str, chars: int, seed: int) -> dict:
    started = time.perf_counter()
    first = None
    last = None
    gaps: list[float] = []
    got = 0
    body = {"model": model, "prompt": "ROMEO:", "max_tokens": chars, "stream": True,
            "seed": seed, "temperature": 0.8}
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if not text:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - started
            else:
                gaps.extend([now - last] * len(text))
            last = now
            got += len(text)
    return {"chars": got, "ttfc": first, "gaps": gaps, "end": time.perf_counter()}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), or NaN."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


async def round_of(url: str, model: str, clients: int, chars: int, pid: int = 0) -> dict:
    cpu_server, cpu_client = cpu_seconds(pid), time.process_time()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, model, chars, seed)
                                         for seed in range(clients)))
    wall = max(r["end"] for r in results) - started
    total = sum(r["chars"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttfc = [r["ttfc"] for r in results]
    return {"server_cpu_s": cpu_seconds(pid) - cpu_server,
            "client_cpu_s": time.process_time() - cpu_client,
            "clients": clients, "chars": total, "seconds": wall, "chars_per_s": total / wall,
            "ttfc_p50_ms": 1000 * pct(ttfc, 0.5), "ttfc_p99_ms": 1000 * pct(ttfc, 0.99),
            "char_p50_ms": 1000 * pct(gaps, 0.5), "char_p99_ms": 1000 * pct(gaps, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: train configs/cpu.toml for 50 steps")
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--chars", type=int, default=1000, help="characters each client asks for")
    ap.add_argument("--json", action="store_true", help="one JSON line per round")
    ap.add_argument("serve_options", nargs="*", help="after --: options for charlm serve")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or train_checkpoint(Path(tmp))
        server = Server(ckpt, args.serve_options)
        try:
            model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            asyncio.run(round_of(server.url, model, 4, 200))  # warm-up
            rows = [asyncio.run(round_of(server.url, model, int(c), args.chars, server.proc.pid))
                    for c in args.clients.split(",")]
        finally:
            server.stop()
    base = rows[0]["chars_per_s"]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"charlm serve, {ckpt}, {args.chars} characters per client, {os.cpu_count()} CPUs")
    print("| clients | chars/s | x one client | first char p50 / p99 (ms) | per char p50 / p99 (ms) "
          "| wall s | server / client CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['chars_per_s']:,.0f} | {r['chars_per_s'] / base:.1f} | "
              f"{r['ttfc_p50_ms']:.1f} / {r['ttfc_p99_ms']:.1f} | "
              f"{r['char_p50_ms']:.2f} / {r['char_p99_ms']:.2f} | {r['seconds']:.2f} | "
              f"{r['server_cpu_s']:.2f} / {r['client_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
