"""The exported web page (``charlm export --format html``): page size in fp16 and int8, the
int8 (and fp16) validation-loss change measured in PyTorch, and generation speed in headless
Chromium (chars/s of ``window.charlm.generate`` at temperature 0.8, one stream), for the
``configs/cpu.toml`` model and an LSTM 512x2.

    charlm train --config configs/cpu.toml --max-steps 50 --out runs/web-cpu
    python benchmarks/web_speed.py --cpu runs/web-cpu [--lstm RUN_OR_PT] [--chars 5000]

Without --lstm the LSTM 512x2 has random weights (tiny Shakespeare's vocabulary): fine for
speed and size, but its loss change is not measured. Needs chromium, chromedriver and
selenium (see tests/export/test_web.py). The speed of a page does not depend on its weight
format (the page decodes every format to Float32Arrays), so it is measured on the fp16 page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from charlm.config import Config
from charlm.data.corpus import tiny_shakespeare
from charlm.data.vocab import Vocab
from charlm.export import web as web_export
from charlm.model.network import build_model
from charlm.runs.directory import checkpoint_in
from charlm.storage import checkpoint


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    driver.set_script_timeout(600)
    return driver


def random_lstm(path: Path) -> Path:
    torch.manual_seed(0)
    vocab = Vocab.from_text(tiny_shakespeare().read_text(encoding="utf-8"))
    cfg = Config.from_dict({"model": {"cell": "lstm", "embed_size": 64, "hidden_size": 512,
                                      "num_layers": 2, "dropout": 0.0}})
    model = build_model(len(vocab), cfg.model)
    checkpoint.save(path, checkpoint.make_checkpoint(model, cfg, vocab))
    return path


def speed(driver, page: Path, chars: int, repeats: int = 3) -> float:
    """Best chars/s over ``repeats`` runs of generate(length=chars), after a warm-up."""
    driver.get(page.resolve().as_uri())
    return driver.execute_async_script("""
        const [chars, repeats, done] = arguments;
        (async () => {
          await window.charlm.generate('\\n', {length: 200, temperature: 0.8, seed: 0});
          let best = 0;
          for (let r = 0; r < repeats; r++) {
            const t = performance.now();
            const text = await window.charlm.generate('\\n', {length: chars, temperature: 0.8, seed: r});
            best = Math.max(best, [...text].length / ((performance.now() - t) / 1000));
          }
          return best;
        })().then(done, (e) => done(-1));
    """, chars, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", type=Path, required=True,
                        help="a run directory or .pt of the configs/cpu.toml model")
    parser.add_argument("--lstm", type=Path, help="an LSTM 512x2 run or .pt (default: random weights)")
    parser.add_argument("--chars", type=int, default=5000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = [("configs/cpu.toml", checkpoint_in(args.cpu), "trained")]
        if args.lstm:
            models.append(("LSTM 512x2", checkpoint_in(args.lstm), "trained"))
        else:
            models.append(("LSTM 512x2", random_lstm(root / "lstm.pt"), "random weights"))
        driver = browser()
        try:
            for name, ckpt, weights in models:
                row = {"model": name, "weights": weights}
                for q in ("fp16", "int8"):
                    out = root / f"{name.replace('/', '_')}-{q}.html"
                    t = time.perf_counter()
                    r = web_export.export_html(ckpt, out, force=True, quantize=q,
                                               measure=weights == "trained")
                    row[f"{q}_bytes"] = r.size
                    row[f"{q}_loss_change"] = r.loss_change
                    row["val_loss"] = r.loss
                    row["parameters"] = r.parameters
                    row[f"{q}_export_s"] = round(time.perf_counter() - t, 2)
                row["chars_per_s"] = speed(driver, root / f"{name.replace('/', '_')}-fp16.html",
                                           args.chars)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            driver.quit()
    print()
    print("| model | parameters | fp16 page | int8 page | val loss | int8 change | fp16 change "
          "| chars/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def change(v):
            return "not measured" if v is None else f"{v:+.4f}"
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        print(f"| {r['model']} ({r['weights']}) | {r['parameters']:,} | {r['fp16_bytes'] / 1e6:.2f} MB "
              f"| {r['int8_bytes'] / 1e6:.2f} MB | {loss} | {change(r['int8_loss_change'])} "
              f"| {change(r['fp16_loss_change'])} | {r['chars_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
