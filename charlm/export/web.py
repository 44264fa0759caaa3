"""Export: a checkpoint as one self-contained web page (``charlm export --format html``).

The page holds the weights (fp16 by default; int8 with one fp32 scale per row; or fp32), the
vocabulary and the model card as data blocks, the model step and sampler in plain JavaScript
(charlm/web/model.js) and the UI shared with ``charlm serve`` (charlm/web). It makes no
request at all: its Content-Security-Policy forbids connections, and nothing is fetched.

What the page computes is checked here on the same rounded weights PyTorch is run on:
:func:`rounded_state_dict` gives the fp32 weights the page uses (fp16 rounded, or int8
dequantized exactly as the page does), and for a quantized export the validation loss of
those weights is measured in PyTorch against the checkpoint's own, on the validation split of
the training text when that file is still where training read it.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm import web
from charlm._version import __version__
from charlm.errors import CharlmError, ConfigError
from charlm.export.writers import check_output
from charlm.files import remove_stale_temporaries
from charlm.storage import checkpoint
from charlm.storage.page import MAX_PAGE_BYTES, PAGE_FORMAT, describe_page  # noqa: F401 - describe_page re-exported

QUANTIZE = ("fp16", "int8", "none")
SUFFIXES = (".html", ".htm")
PAGE_VERSION = 1
# A page is loaded whole by the browser and its weights decoded into Float32Arrays: beyond
# these it is slow to open, and generation far below a useful speed.
MAX_PARAMETERS = 20_000_000
# Validation characters the loss change is measured on (a prefix of the split beyond this).
MAX_EVAL_CHARS = 500_000


@dataclass
class HtmlExportResult:
    path: Path
    size: int  # bytes
    quantize: str
    cell: str
    parameters: int
    loss: float | None  # validation loss of the checkpoint's weights, nats/char
    loss_page: float | None  # ... of the page's (rounded) weights
    loss_note: str  # why the loss change was not measured, or ""
    loss_chars: int = 0  # validation characters the losses are measured over

    @property
    def loss_change(self) -> float | None:
        if self.loss is None or self.loss_page is None:
            return None
        return self.loss_page - self.loss


def pack(state: dict[str, torch.Tensor], quantize: str) -> tuple[list[dict[str, Any]], bytes]:
    """The page's tensor table and weight bytes (little-endian, each part 4-byte aligned).

    fp16: every matrix as IEEE half; int8: every matrix as int8 with one fp32 scale per row
    (max |row| / 127, symmetric); none: fp32. Biases stay fp32 in every mode (a few KB)."""
    table: list[dict[str, Any]] = []
    blob = bytearray()

    def put(data: bytes) -> int:
        while len(blob) % 4:
            blob.append(0)
        at = len(blob)
        blob.extend(data)
        return at

    for name, value in state.items():
        t = value.detach().float().cpu().contiguous()
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape)}
        a = t.numpy()
        if t.dim() != 2 or quantize == "none":
            entry["dtype"], entry["offset"] = "f32", put(a.astype("<f4").tobytes())
        elif quantize == "fp16":
            entry["dtype"], entry["offset"] = "f16", put(a.astype("<f2").tobytes())
        else:
            q, scales = quantize_rows(t)
            entry["dtype"], entry["offset"] = "i8", put(q.numpy().astype("i1").tobytes())
            entry["scales"] = put(scales.numpy().astype("<f4").tobytes())
        table.append(entry)
    return table, bytes(blob)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row: (q int8 (R, C), scales fp32 (R,))."""
    peak = t.abs().amax(dim=1)
    scales = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak)).float()
    q = torch.clamp(torch.round(t / scales[:, None]), -127, 127).to(torch.int8)
    return q, scales


def rounded_state_dict(state: dict[str, torch.Tensor], quantize: str) -> dict[str, torch.Tensor]:
    """The fp32 weights the page computes with: ``state`` rounded as :func:`pack` stores it
    (int8 dequantized as q * scale in fp32, which is what the page's JavaScript computes)."""
    out = {}
    for name, value in state.items():
        t = value.detach().float().cpu()
        if t.dim() != 2 or quantize == "none":
            out[name] = t.clone()
        elif quantize == "fp16":
            out[name] = t.half().float()
        else:
            q, scales = quantize_rows(t)
            out[name] = q.float() * scales[:, None]
    return out


def unpack(table: list[dict[str, Any]], blob: bytes) -> dict[str, torch.Tensor]:
    """The fp32 tensors of :func:`pack`'s output, decoded as the page decodes them."""
    out = {}
    for e in table:
        shape = tuple(e["shape"])
        n = int(np.prod(shape)) if shape else 1
        if e["dtype"] == "f32":
            a = np.frombuffer(blob, "<f4", n, e["offset"]).astype(np.float32)
        elif e["dtype"] == "f16":
            a = np.frombuffer(blob, "<f2", n, e["offset"]).astype(np.float32)
        else:
            q = np.frombuffer(blob, "i1", n, e["offset"]).astype(np.float32).reshape(shape)
            s = np.frombuffer(blob, "<f4", shape[0], e["scales"])
            a = q * s[:, None]
        out[e["name"]] = torch.from_numpy(a.reshape(shape).copy())
    return out


def run_name(checkpoint_path: Path) -> str:
    """The run a checkpoint belongs to (its directory's name for best.pt/last.pt), else the
    file's own stem."""
    p = Path(checkpoint_path)
    if p.name in ("best.pt", "last.pt") and p.parent.name not in ("", ".", ".."):
        return p.parent.name
    if p.name in ("best.pt", "last.pt"):
        return p.resolve().parent.name or p.stem
    return p.stem


def card(ckpt: dict[str, Any], run: str, quantize: str) -> dict[str, Any]:
    d = checkpoint.describe(ckpt)
    best = d["best_val_loss"]  # inf (never evaluated) or missing: not shown
    best = float(best) if isinstance(best, int | float) and math.isfinite(best) else None
    return {
        "cell": d["cell"], "embed_size": d["embed_size"], "hidden_size": d["hidden_size"],
        "num_layers": d["num_layers"], "parameters": d["parameters"], "vocab_size": d["vocab_size"],
        "train_file": d["train_file"]["name"], "best_val_loss": best,
        "charlm_version": __version__, "run": run,
        "weights": {"fp16": "fp16", "int8": "int8 (one scale per row)", "none": "fp32"}[quantize],
    }


def validation_loss_change(ckpt: dict[str, Any], rounded: dict[str, torch.Tensor]
                           ) -> tuple[float | None, float | None, str, int]:
    """Validation loss (nats/char) of the checkpoint's weights and of the rounded weights, in
    PyTorch fp32 on the CPU, over the validation split of the training text (at most
    MAX_EVAL_CHARS characters of it), why not ("" when measured) and the characters counted."""
    from charlm.data.batching import as_tensor, load_corpus, split
    from charlm.evaluate import mean_loss

    source = ckpt.get("train_file") if isinstance(ckpt.get("train_file"), dict) else {}
    path = source.get("path")
    if not isinstance(path, str) or not path:
        return None, None, "not measured: the checkpoint does not say where its training text is", 0
    if not Path(path).is_file():
        return None, None, "not measured: the training text is no longer at the path training read", 0
    cfg = checkpoint.config_of(ckpt)
    try:
        corpus = load_corpus(path, vocab=checkpoint.vocab_of(ckpt), encoding=cfg.data.encoding,
                             errors=cfg.data.errors, drop_unknown=True, newline=cfg.data.newline,
                             evaluating=True)
    except (CharlmError, OSError, UnicodeError):
        return None, None, "not measured: the training text cannot be read", 0
    if source.get("sha256") and corpus.source.sha256 != source.get("sha256"):
        return None, None, "not measured: the training text has changed since training", 0
    _, val = split(corpus.ids, cfg.data.val_fraction)
    val = np.asarray(val[:MAX_EVAL_CHARS]).astype(np.int64)
    if len(val) < 2:
        return None, None, "not measured: the validation split is empty", 0
    ids = as_tensor(val, torch.device("cpu"))
    model = checkpoint.model_of(ckpt)
    with torch.inference_mode():
        before = mean_loss(model, ids, seq_len=256)
        model.load_state_dict(rounded)
        after = mean_loss(model, ids, seq_len=256)
    return before, after, "", len(val) - 1


def default_output(checkpoint_path: str | Path) -> Path:
    return Path(checkpoint_path).with_suffix(".html")


def build_page(ckpt: dict[str, Any], run: str, quantize: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The page's HTML and the fp32 weights it computes with."""
    cfg = checkpoint.config_of(ckpt)
    vocab = checkpoint.vocab_of(ckpt)
    model = checkpoint.model_of(ckpt)  # checks the weights against the config
    state = {k: v for k, v in model.state_dict().items()}
    rounded = rounded_state_dict(state, quantize)
    for name, t in rounded.items():
        if not bool(torch.isfinite(t).all()):
            why = ("beyond fp16's range (|w| > 65504); use --quantize int8 or none"
                   if bool(torch.isfinite(state[name]).all()) else "not finite (NaN or inf)")
            raise CharlmError(f"cannot export {name} as a web page: its weights are {why}")
    table, blob = pack(state, quantize)
    decoded = unpack(table, blob)
    for name, want in rounded.items():  # the bytes decode to exactly the weights checked
        if not torch.equal(decoded[name], want):
            raise CharlmError(f"HTML export failed: {name} does not decode to its rounded weights")
    meta = {
        "format": PAGE_FORMAT, "format_version": PAGE_VERSION, "cell": cfg.model.cell,
        "embed_size": cfg.model.embed_size, "hidden_size": cfg.model.hidden_size,
        "num_layers": cfg.model.num_layers, "vocab": list(vocab.chars), "weights": quantize,
        "tensors": table, "card": card(ckpt, run, quantize),
    }
    text = web.page(web.read("model.js"), title=f"charlm: {run}", data={"charlm-model": meta},
                    raw_data={"charlm-weights": base64.b64encode(blob).decode("ascii")})
    return text, rounded


def export_html(checkpoint_path: str | Path, output: str | Path | None = None, force: bool = False,
                quantize: str = "fp16", measure: bool = True) -> HtmlExportResult:
    """Write the page of a .pt checkpoint (or .safetensors export) to ``output`` (default: next
    to the checkpoint, .html). An existing ``output`` is replaced only with ``force``, atomically.
    ``measure``: the validation-loss change of fp16/int8 weights (see module docstring)."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    src = Path(checkpoint_path)
    out = Path(output) if output is not None else default_output(src)
    if out.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"the output of --format html must end in .html: {out}")
    ckpt = checkpoint.read(src)
    check_output(out, src, force)
    checkpoint.check_weights(ckpt)
    parameters = sum(t.numel() for t in ckpt["model"].values())
    if parameters > MAX_PARAMETERS:
        raise CharlmError(
            f"the model has {parameters:,} parameters, more than a web page can hold (limit "
            f"{MAX_PARAMETERS:,}); export a smaller model, or use --format onnx"
        )
    run = run_name(src)
    text, rounded = build_page(ckpt, run, quantize)
    data = text.encode("utf-8")
    if len(data) > MAX_PAGE_BYTES:
        raise CharlmError(
            f"the page would be {len(data):,} bytes, more than a web page should be (limit "
            f"{MAX_PAGE_BYTES:,}); use --quantize int8 or export a smaller model"
        )
    loss = loss_page = None
    chars = 0
    note = "exact (fp32 weights)" if quantize == "none" else "not measured"
    if measure and quantize != "none":
        loss, loss_page, note, chars = validation_loss_change(ckpt, rounded)
    remove_stale_temporaries(out)  # left by an export that was killed
    checkpoint.atomic_write(out, lambda f: f.write(data))
    cfg = checkpoint.config_of(ckpt)
    return HtmlExportResult(out, out.stat().st_size, quantize, cfg.model.cell, parameters,
                            loss, loss_page, note, chars)
