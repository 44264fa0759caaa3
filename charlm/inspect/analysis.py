"""``charlm inspect``: run a trained model over a text and collect what the page shows and
``--json`` prints: surprise per character, units that track features of the text, gate
saturation and the memory curve. :func:`inspect_checkpoint` is the whole command."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from charlm.data.vocab import Vocab
from charlm.errors import ConfigError, DataError
from charlm.inspect import features as feat
from charlm.inspect import memory
from charlm.inspect.activations import GATES, KEEP_GATE, run_chunks
from charlm.inspect.memory import KS
from charlm.model.network import CharRNN
from charlm.units import LN2

DEFAULT_CHARS = 5_000
MAX_CHARS = 200_000
SHOW_CHARS = 10_000  # characters drawn with their surprise on the page
UNIT_BYTES = 3 << 20  # bytes of activations (one byte per unit and character) on the page
SHOW_UNIT_CHARS = 3_000  # at most this many characters for the unit view
SATURATED = (0.1, 0.9)
BINS = 20
TOP = 5  # predictions shown per character
SURPRISING = 20
METHOD = ("Pearson correlation between a unit's value after each character and the feature "
          "at that character, over all {chars:,} inspected characters; for each feature the "
          "unit with the largest |r| in each layer and state. A correlation says the two move "
          "together on this text, not that the unit computes the feature.")


@dataclass
class Inspection:
    """``document``: the numbers (``--json``); ``page``: what only the page draws (the text,
    per-character predictions, activations of every unit over its start)."""

    document: dict
    page: dict = field(default_factory=dict)


def check_chars(chars: int) -> None:
    if not 2 <= chars <= MAX_CHARS:
        raise ConfigError(f"--chars must be between 2 and {MAX_CHARS:,}; got {chars:,} "
                          f"(inspection keeps every unit's value for each character)")


def _q(values: torch.Tensor) -> bytes:
    """Values in [-1, 1] as bytes 0..254 (127 is zero), row-major."""
    return ((values.clamp(-1, 1) + 1) * 127).round().to(torch.uint8).numpy().tobytes()


def inspect_model(model: CharRNN, vocab: Vocab, text: str,
                  on_stage: Callable[[str], None] | None = None) -> Inspection:
    """Inspect ``model`` over ``text`` (characters of its vocabulary only, at least two).

    In one CPU thread: the work is one stream stepped a character at a time and small
    batches, which threads barely speed up, while on a busy machine threads that wait on each
    other made the memory curve 40x slower (22 s against 0.6 s, measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _inspect_model(model, vocab, text, on_stage)
    finally:
        torch.set_num_threads(threads)


def _inspect_model(model: CharRNN, vocab: Vocab, text: str,
                   on_stage: Callable[[str], None] | None) -> Inspection:
    from charlm.evaluate import evaluate_model

    started = time.perf_counter()
    note = on_stage or (lambda stage: None)
    model = model.float().cpu().eval()
    cfg = model.cfg
    cell, L, H = cfg.cell, cfg.num_layers, cfg.hidden_size
    ids = vocab.encode(text)
    n = len(ids)
    if n < 2:
        raise DataError("the text has fewer than 2 characters in the model's vocabulary; "
                        "nothing to inspect")
    kinds = ["h", "c"] if cell == "lstm" else ["h"]
    feats_all = feat.text_features(text)
    corr = {(k, kind): feat.Correlator(H, len(feat.FEATURES)) for k in range(L) for kind in kinds}
    gate_names = GATES[cell]
    left = {(k, g): np.zeros(H) for k in range(L) for g in gate_names}
    right = {(k, g): np.zeros(H) for k in range(L) for g in gate_names}
    hist = {k: np.zeros(BINS, dtype=np.int64) for k in range(L)}
    show = min(n, SHOW_CHARS)
    show_units = max(1, min(n, SHOW_UNIT_CHARS, UNIT_BYTES // max(1, L * len(kinds) * H)))
    unit_parts = {(k, kind): [] for k in range(L) for kind in kinds}
    losses = np.zeros(n - 1)
    top_ids = np.zeros((n, TOP), dtype=np.int64)  # the most likely next characters
    top_p = np.zeros((n, TOP))
    target = torch.as_tensor(ids[1:], dtype=torch.long)
    note("stepping the model")
    for chunk in run_chunks(model, ids):
        s, T = chunk.start, chunk.h[0].shape[0]
        f = feats_all[s : s + T]
        for k in range(L):
            for kind in kinds:
                acts = (chunk.h if kind == "h" else chunk.c)[k]
                corr[k, kind].add(acts.double().numpy(), f)
                if s < show_units:
                    shown = acts[: show_units - s]
                    unit_parts[k, kind].append(_q(shown if kind == "h" else torch.tanh(shown)))
            for g in gate_names:
                v = chunk.gates[k][g]
                left[k, g] += (v < SATURATED[0]).sum(0).double().numpy()
                right[k, g] += (v > SATURATED[1]).sum(0).double().numpy()
            if cell in KEEP_GATE:
                v = chunk.gates[k][KEEP_GATE[cell]]
                hist[k] += torch.histc(v, BINS, 0, 1).long().numpy()
        logp = torch.log_softmax(chunk.logits, dim=1)  # (T, V): predictions of s+1 .. s+T
        m = min(T, n - 1 - s)  # the last character predicts nothing
        losses[s : s + m] = -logp[torch.arange(m), target[s : s + m]].double().numpy()
        p, i = logp.exp().topk(min(TOP, len(vocab)), dim=1)
        top_p[s : s + T, : p.shape[1]] = p.numpy()
        top_ids[s : s + T, : i.shape[1]] = i.numpy()
    bits = losses / LN2
    note("the memory curve")
    where = memory.positions(n)
    curve = memory.curve(model, ids, losses, where)
    note("evaluating as charlm eval does")
    eval_result = evaluate_model(model, vocab, text, "fp32", newline="keep")

    classes = [feat.char_class(c) for c in text[1:]]
    by_class = {}
    cls_arr = np.array(classes)
    for name in feat.CLASSES:
        mask = cls_arr == name
        if mask.any():
            by_class[name] = {"chars": int(mask.sum()), "bits_per_char": float(bits[mask].mean())}
    order = np.argsort(-bits, kind="stable")[:SURPRISING]
    surprising = []
    for j in order:
        t = int(j) + 1  # the character predicted
        pred = (top_ids[t - 1], top_p[t - 1])
        surprising.append({
            "position": t, "char": text[t], "bits": float(bits[j]),
            "before": text[max(0, t - 40) : t], "after": text[t + 1 : t + 11],
            "predicted": [[vocab.chars[int(a)], float(b)] for a, b in zip(*pred, strict=True)
                          if b > 0],
        })
    units = []
    correlations = {}
    for (k, kind), c in corr.items():
        r = c.correlations()
        correlations[k, kind] = r
        for name, index, value in feat.best_units(r):
            units.append({"layer": k, "kind": kind, "index": index, "feature": name,
                          "correlation": value})
    units.sort(key=lambda u: -abs(u["correlation"]))
    gates = [{"layer": k, "gate": g, "left": (left[k, g] / n).tolist(),
              "right": (right[k, g] / n).tolist()} for k in range(L) for g in gate_names]
    distribution = ([{"layer": k, "gate": KEEP_GATE[cell], "edges": np.linspace(0, 1, BINS + 1).tolist(),
                      "counts": hist[k].tolist()} for k in range(L)] if cell in KEEP_GATE else [])
    mean = float(losses.mean())
    document = {
        "chars": n, "cell": cell, "layers": L, "hidden_size": H,
        "loss": mean, "bits_per_char": mean / LN2,
        "eval_bits_per_char": eval_result.bpc,
        "by_class": by_class, "surprising": surprising,
        "units": units, "features": feat.FEATURES, "method": METHOD.format(chars=n),
        "gates": gates, "gate_distribution": distribution,
        "saturation": {"left_below": SATURATED[0], "right_above": SATURATED[1]},
        "memory": curve, "memory_positions": len(where),
        # nats/char that the context beyond 64 characters saves at those positions
        "memory_gain_beyond_64": curve[KS.index(64)]["loss"] - curve[-1]["loss"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    page = {
        "text": text[:show], "vocab": list(vocab.chars),
        "bits": [round(float(b), 2) for b in bits[: show - 1]],
        "top_ids": top_ids[: show - 1].tolist(),
        "top_p": np.round(top_p[: show - 1], 3).tolist(),
        "unit_chars": show_units, "kinds": kinds,
        "units": {f"{k}{kind}": base64.b64encode(b"".join(unit_parts[k, kind])).decode("ascii")
                  for k in range(L) for kind in kinds},
        "r": {f"{k}{kind}": np.nan_to_num(np.round(r, 3)).tolist()
              for (k, kind), r in correlations.items()},
    }
    return Inspection(document, page)


# ------------------------------------------------------------------------------ the text
def validation_text(ckpt: dict, vocab: Vocab, cfg, chars: int) -> tuple[str, str, int, bool]:
    """The start of the run's validation split: (text, what it is, unknown dropped, cut)."""
    from charlm.data.batching import load_corpus, split

    source = ckpt.get("train_file") if isinstance(ckpt.get("train_file"), dict) else {}
    path = source.get("path")
    if not isinstance(path, str) or not path:
        raise DataError("the checkpoint does not record its training text, so it has no "
                        "validation split to inspect; give a TEXT file")
    if not Path(path).exists():
        raise DataError(f"the training text {path} is gone, so the validation split cannot "
                        "be read; give a TEXT file")
    corpus = load_corpus(path, vocab=vocab, encoding=cfg.data.encoding, errors=cfg.data.errors,
                         drop_unknown=True, newline=cfg.data.newline)
    if source.get("sha256") and corpus.source.sha256 != source["sha256"]:
        raise DataError(f"the training text {path} has changed since training, so its "
                        "validation split is not the run's; give a TEXT file")
    _, val = split(corpus.ids, cfg.data.val_fraction)
    if len(val) < 2:
        raise DataError("the run's validation split is empty (data.val_fraction = 0); "
                        "give a TEXT file")
    return (vocab.decode(np.asarray(val[:chars])), f"validation split of {path}", 0,
            len(val) > chars)


def file_text(path: Path, vocab: Vocab, cfg, chars: int) -> tuple[str, str, int, bool]:
    """The first ``chars`` characters of a text file (read as ``charlm eval`` reads it),
    those outside the vocabulary dropped: (text, what it is, unknown dropped, cut)."""
    from charlm.data.text import read_text, resolve_source

    kept, dropped, total = [], 0, 0
    known = set(vocab.chars)
    cut = False
    for piece in read_text(resolve_source(path), cfg.data.encoding, cfg.data.errors,
                           cfg.data.newline):
        for ch in piece:
            if total >= chars:
                cut = True
                break
            total += 1
            if ch in known:
                kept.append(ch)
            else:
                dropped += 1
        if cut:
            break
    if total == 0:
        raise DataError(f"{path} is empty; nothing to inspect")
    return "".join(kept), str(path), dropped, cut


def inspect_checkpoint(checkpoint_path: str | Path, text_path: str | Path | None = None,
                       chars: int = DEFAULT_CHARS,
                       on_stage: Callable[[str], None] | None = None) -> Inspection:
    """The whole of ``charlm inspect``: load a .pt checkpoint or .safetensors export (the same
    checks and errors as ``charlm eval``), read the text (default: the start of the run's
    validation split) and inspect the model over its first ``chars`` characters."""
    from charlm.storage import checkpoint

    check_chars(chars)
    ckpt = checkpoint.read(checkpoint_path)
    cfg = checkpoint.config_of(ckpt)
    vocab = checkpoint.vocab_of(ckpt)
    model = checkpoint.model_of(ckpt, "cpu")
    if text_path is None:
        text, what, dropped, cut = validation_text(ckpt, vocab, cfg, chars)
    else:
        text, what, dropped, cut = file_text(Path(text_path), vocab, cfg, chars)
    if len(text) < 2:
        raise DataError(f"{what} has fewer than 2 characters in the model's vocabulary; "
                        "nothing to inspect")
    result = inspect_model(model, vocab, text, on_stage)
    path = Path(checkpoint_path)
    run = path.parent.name if path.name in ("best.pt", "last.pt") else path.stem
    result.document = {"checkpoint": str(checkpoint_path), "run": run, "text": what,
                       "cut": cut, "unknown": dropped, **result.document}
    return result


def inspect_to_page(checkpoint_path: str | Path, text_path: str | Path | None, output: str | Path,
                    chars: int = DEFAULT_CHARS, force: bool = False,
                    on_stage: Callable[[str], None] | None = None) -> Inspection:
    """:func:`inspect_checkpoint`, then the page written to ``output`` (an existing file is
    replaced only when it is such a page, or with ``force``); ``document["page"]`` names it."""
    from charlm.inspect.report import check_output, write_page

    output = Path(output)
    check_output(output, force)  # before the work, not after
    result = inspect_checkpoint(checkpoint_path, text_path, chars, on_stage)
    size = write_page(output, result.document, result.page, force)
    result.document = {**result.document, "page": str(output), "page_bytes": size}
    return result
