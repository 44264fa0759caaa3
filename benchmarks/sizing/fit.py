"""Fit the sizing law to the sweep runs and write it where charlm reads it.

    python benchmarks/sizing/fit.py benchmarks/sizing/sweep.jsonl [--write]

The law (``charlm.training.sizing``): best validation loss after training on C characters of a text
of D training characters, with a model of N parameters and dropout d,

    loss = E[text] + A / (g N)^alpha + B / C_eff^beta       (g = 1 for an LSTM, gru for a GRU)
    C_eff = u C                                         (up to one epoch, u = 1 - kappa d)
          = u D (1 + R_d (1 - exp(-(C/D - 1) / R_d)))   (past it; R_d = R (1 + rho d))

E is one number per text (its entropy, which no candidate changes), the rest is shared.
Fitted by least squares on the loss (L-BFGS over log-parameters). Prints each run's fitted
and measured loss; ``--write`` stores the shared numbers in charlm/sizing_rule.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

RULE = Path(__file__).resolve().parents[2] / "charlm" / "sizing_rule.json"
NAMES = ("A", "alpha", "B", "beta", "R", "rho", "kappa", "gru")


def law(p: dict, E, N, C, D, d, gru):
    """``gru``: 1 for a GRU run, 0 for an LSTM run."""
    u = 1.0 - p["kappa"] * d
    Rd = p["R"] * (1.0 + p["rho"] * d)
    e = C / D
    past = D * (1.0 + Rd * (1.0 - torch.exp(-(torch.clamp(e, min=1.0) - 1.0) / Rd)))
    ceff = u * torch.where(e <= 1.0, C, past)
    return E + p["A"] / (N * p["gru"] ** gru) ** p["alpha"] + p["B"] / ceff ** p["beta"]


def fit(runs: list[dict], key: str = "best_val") -> tuple[dict, dict]:
    texts = sorted({r["corpus"] for r in runs})
    t = lambda k: torch.tensor([float(r[k]) for r in runs], dtype=torch.float64)  # noqa: E731
    N, C, D, d, y = t("params"), t("chars_seen"), t("train_chars"), t("dropout"), t(key)
    g = t("gru")
    which = torch.tensor([texts.index(r["corpus"]) for r in runs])
    # log-parameters (positive numbers), started where the loss curves of char models sit
    raw = {"A": math.log(30.0), "alpha": math.log(0.3), "B": math.log(50.0), "beta": math.log(0.3),
           "R": math.log(10.0), "rho": math.log(2.0), "kappa": math.log(0.3), "gru": 0.0}
    x = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in raw.items()}
    E = torch.full((len(texts),), 1.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([*x.values(), E], max_iter=300, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def params():
        p = {k: v.exp() for k, v in x.items()}
        p["kappa"] = torch.sigmoid(x["kappa"])  # dropout never makes learning free or negative
        return p

    def closure():
        opt.zero_grad()
        loss = ((law(params(), E[which], N, C, D, d, g) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    p = {k: float(v.detach()) for k, v in params().items()}
    return p, {text: float(e) for text, e in zip(texts, E.detach(), strict=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    runs = [json.loads(line) for line in args.sweep.read_text().splitlines() if line.strip()]
    for r in runs:
        r["train_chars"] = int(r["text_chars"] * 0.9)
        r["gru"] = int(r["shape"].startswith("gru"))
    p, E = fit(runs)
    print("fitted:", ", ".join(f"{k} {v:.4g}" for k, v in p.items()),
          "| E:", ", ".join(f"{k} {v:.3f}" for k, v in E.items()))
    t = lambda k: torch.tensor([float(r[k]) for r in runs], dtype=torch.float64)  # noqa: E731
    pred = law({k: torch.tensor(v) for k, v in p.items()},
               torch.tensor([E[r["corpus"]] for r in runs], dtype=torch.float64),
               t("params"), t("chars_seen"), t("train_chars"), t("dropout"), t("gru"))
    print(f"{'text':12} {'shape':10} {'s here':>6} {'drop':>4} {'epochs':>6} {'best val':>8} "
          f"{'final':>7} {'fitted':>7}")
    for r, f in sorted(zip(runs, pred.tolist(), strict=True),
                       key=lambda rf: (rf[0]["corpus"], rf[0]["params"], rf[0]["seconds_here"])):
        print(f"{r['corpus']:12} {r['shape']:10} {r['seconds_here']:>6} {r['dropout']:>4} "
              f"{r['chars_seen'] / r['train_chars']:>6.1f} {r['best_val']:>8.4f} "
              f"{r['final_val']:>7.4f} {f:>7.4f}")
    rms = float(((pred - t("best_val")) ** 2).mean().sqrt())
    print(f"rms error {rms:.4f} nats over {len(runs)} runs")
    errors = []  # each run predicted by a fit without it (its text's E from the other runs)
    for i, r in enumerate(runs):
        rest = runs[:i] + runs[i + 1:]
        if not any(o["corpus"] == r["corpus"] for o in rest):
            continue
        q, Eq = fit(rest)
        f = law({k: torch.tensor(v) for k, v in q.items()}, torch.tensor(Eq[r["corpus"]]),
                *(torch.tensor(float(r[k]), dtype=torch.float64)
                  for k in ("params", "chars_seen", "train_chars", "dropout", "gru")))
        errors.append(float(f) - r["best_val"])
    loo = (sum(e * e for e in errors) / len(errors)) ** 0.5
    print(f"leave-one-out rms error {loo:.4f} nats (largest {max(map(abs, errors)):.4f})")
    if args.write:
        rule = {**{k: round(v, 6) for k, v in p.items()},
                "fitted_on": f"{args.sweep.name}: {len(runs)} runs, rms {rms:.4f}, "
                             f"leave-one-out rms {loo:.4f}"}
        RULE.write_text(json.dumps(rule, indent=1) + "\n")
        print(f"wrote {RULE}")


if __name__ == "__main__":
    main()
