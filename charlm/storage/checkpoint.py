"""Checkpoints: plain data written atomically and loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values only (no pickled modules or
classes), so ``torch.load(path, weights_only=True)`` reads it and a crafted file cannot run
code. Every file is written atomically (:mod:`charlm.files`), so a crash at any moment
leaves the previous file intact.

Over 300 lines: reading a file, checking what it claims (config, vocabulary, weight shapes)
and describing it are one concern, and the checks belong next to the reader.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from charlm._version import __version__
from charlm.config import SHAPE_FIELDS, Config, validate
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError, CheckpointError, first_line, path_error
from charlm.files import atomic_write, atomic_write_text  # noqa: F401 - re-exported
from charlm.model.network import CharRNN, build_model, parameter_shapes
from charlm.units import bits

FORMAT = "charlm-checkpoint"
FORMAT_VERSION = 1


def save(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def make_checkpoint(model: CharRNN, cfg: Config, vocab: Vocab, **extra: Any) -> dict[str, Any]:
    """The plain-data checkpoint of a model; ``extra`` adds training state."""
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "charlm_version": __version__,
        "torch_version": str(torch.__version__),
        "config": cfg.to_dict(),
        "vocab": list(vocab.chars),
        # Always fp32 on CPU, so a GPU checkpoint loads anywhere.
        "model": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
    }
    ckpt.update(extra)
    return ckpt


def _detail(exc: BaseException) -> str:
    """The first sentence of an exception's message, on one line (or its type's name)."""
    text = " ".join(str(exc).split())
    first = re.split(r"(?<=[.:;])\s", text, maxsplit=1)[0].rstrip(".:;")
    # Bare numbers (a KeyError's key, an opcode) tell the user nothing.
    return first[:160] if re.search(r"[A-Za-z]{3}", first) else type(exc).__name__


def _verify_archive(path: Path) -> None:
    """``torch.save`` writes a zip archive with a CRC-32 per entry, and ``torch.load`` never
    checks them: verify them here, so that flipped bytes are reported instead of loaded as
    silently damaged weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
            if packed:
                # torch.save never compresses; a compressed part can unpack to gigabytes.
                raise CheckpointError(
                    f"{path} is not a checkpoint torch wrote: its part {packed[0]!r} is "
                    "compressed; refused"
                )
            bad = archive.testzip()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes is damage
        # A seek to a bogus offset fails with EINVAL, which names nothing useful.
        why = "its index points outside the file" if isinstance(exc, OSError) else _detail(exc)
        raise CheckpointError(f"{path} is damaged and cannot be read ({why})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupted: its part {bad!r} fails its checksum")


def load(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint, refusing anything unsafe, damaged or foreign.

    Only ``torch.load(weights_only=True)`` ever reads the pickled data, so a crafted file
    cannot run code; every failure becomes a one-line :class:`CheckpointError`.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if not path.is_file():
            raise CheckpointError(f"checkpoint is not a file: {path}")
        with open(path, "rb"):  # permission denied is said as such, not as damage
            pass
    except OSError as exc:
        raise (path_error(exc, path) or CheckpointError(
            f"cannot read {path}: {exc.strerror or exc}")) from None
    archive = zipfile.is_zipfile(path)
    if archive:
        _verify_archive(path)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the error below says more.
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)|Unsupported class (\S+)", str(exc))
        if found:
            what = found.group(1) or found.group(2)
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects ({what}) that a charlm "
                "checkpoint never contains (possibly malicious); nothing in it was run"
            ) from None
        raise CheckpointError(
            f"{path} is not a charlm checkpoint or is damaged (its data is not plain tensors "
            "and values); nothing in it was run"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes is damage
        # torch.save writes a zip archive whose directory comes last: without one, the file
        # was cut short or never was a checkpoint, and torch's own error says nothing useful.
        why = _detail(exc) if archive else "it is not a complete checkpoint archive"
        raise CheckpointError(
            f"{path} is damaged or truncated and cannot be read ({why})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charlm checkpoint")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint format version: {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this charlm reads "
            f"({FORMAT_VERSION}); upgrade charlm (pip install -U charlm)"
        )
    for key, kind in (("config", dict), ("vocab", list), ("model", dict)):
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"{path} is not a complete charlm checkpoint (no valid {key!r})")
    return ckpt


def config_of(ckpt: dict[str, Any]) -> Config:
    """The checkpoint's config, checked like a config from the command line (types, ranges,
    choices) before anything is built from it."""
    data = ckpt.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint config is invalid: a {type(data).__name__}, not a table")
    try:
        return validate(Config.from_dict(data, source="checkpoint config"))
    except CharlmError as exc:
        raise CheckpointError(f"checkpoint config is invalid: {exc}") from None


def vocab_of(ckpt: dict[str, Any]) -> Vocab:
    try:
        vocab = Vocab(tuple(ckpt["vocab"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint vocabulary is invalid: {exc}") from None
    if not len(vocab):
        raise CheckpointError("checkpoint vocabulary is invalid: it is empty")
    return vocab


def check_weights(ckpt: dict[str, Any]) -> None:
    """Refuse weights that do not match the checkpoint's own config and vocabulary (names,
    shapes, floating dtype), before a model of that config is allocated: a crafted config
    could otherwise ask for gigabytes in a file of a few kilobytes."""
    cfg = config_of(ckpt)
    want = parameter_shapes(len(vocab_of(ckpt)), cfg.model)
    weights = ckpt.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError("checkpoint weights are missing")
    problems = [f"no {name}" for name in want if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in want]
    for name, shape in want.items():
        t = weights.get(name)
        if name in weights and not isinstance(t, torch.Tensor):
            problems.append(f"{name} is not a tensor")
        elif name in weights and tuple(t.shape) != shape:
            problems.append(f"{name} is {tuple(t.shape)}, the config needs {shape}")
        elif name in weights and not t.dtype.is_floating_point:
            problems.append(f"{name} has dtype {t.dtype}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        m = cfg.model
        raise CheckpointError(
            f"checkpoint weights do not fit its config ({m.cell}, embed_size {m.embed_size}, "
            f"hidden_size {m.hidden_size}, num_layers {m.num_layers}, {len(ckpt['vocab'])} "
            f"characters): {'; '.join(str(p) for p in problems[:3])}{more}"
        )


def model_of(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> CharRNN:
    """Rebuild the model of a checkpoint with its weights, in eval mode."""
    cfg = config_of(ckpt)
    check_weights(ckpt)
    model = build_model(len(ckpt["vocab"]), cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint weights do not fit its config: {first_line(exc)}") from None
    return model.to(device).eval()


def read(path: str | Path) -> dict[str, Any]:
    """A .pt checkpoint, or a .safetensors export as the same kind of dict (format_version,
    config, vocab, model; no training state), for commands that only need the model."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        from charlm.storage.safetensors import read_safetensors  # needs the optional safetensors

        return read_safetensors(path)
    if suffix == ".onnx":
        raise CheckpointError(
            f"{path} is an ONNX export, which only `charlm sample` reads; use the .pt checkpoint"
        )
    if suffix in (".html", ".htm"):
        from charlm.storage.page import page_error  # says what the page holds

        raise page_error(path)
    return load(path)


def describe_file(path: str | Path) -> dict[str, Any]:
    """``charlm info``: :func:`describe` of the checkpoint (or export) at ``path``, its
    weights checked first so that the numbers describe real weights."""
    ckpt = read(path)
    check_weights(ckpt)
    return describe(ckpt)


def describe(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What ``charlm info`` shows about a checkpoint read by :func:`read`, as plain values
    (None where the file does not say: an export has no training state)."""
    cfg = config_of(ckpt)
    ts = ckpt.get("train_state") if isinstance(ckpt.get("train_state"), dict) else {}
    source = ckpt.get("train_file") if isinstance(ckpt.get("train_file"), dict) else {}
    best = ts.get("best_val_loss")
    return {
        "cell": cfg.model.cell, "embed_size": cfg.model.embed_size,
        "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
        "dropout": cfg.model.dropout,
        "parameters": sum(t.numel() for t in ckpt["model"].values()),
        "vocab_size": len(ckpt["vocab"]), "vocab_growth": growth_of(ckpt),
        "steps": ts.get("step"), "epochs": ts.get("epoch"), "elapsed": ts.get("elapsed"),
        "best_val_loss": best,
        "best_val_bpc": bits(best) if isinstance(best, int | float) else None,
        "train_file": {key: source.get(key) for key in ("name", "size", "sha256")},
        "format_version": ckpt.get("format_version"),
        "charlm_version": ckpt.get("charlm_version"), "torch_version": ckpt.get("torch_version"),
        "config": cfg.to_dict(),
    }


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[CharRNN, Vocab]:
    """The model (eval mode, on ``device``) and vocabulary of a .pt or .safetensors file."""
    ckpt = read(path)
    return model_of(ckpt, device), vocab_of(ckpt)


# The parameters with one row per character (CharRNN's embedding and output layer).
VOCAB_ROWS = ("embed.weight", "head.weight", "head.bias")


def grow_vocab(ckpt: dict[str, Any], cps) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint with its vocabulary grown by the code points ``cps`` it lacks, for
    fine-tuning on text with new characters; returns it and the added characters.

    Old characters keep their ids and weights. Each new character starts from the mean of the
    old rows of the embedding, the output weights and the output bias: an average character,
    which fine-tuning then moves (textgenrnn and char-rnn users asked for this, see docs/training.md).
    The growth is recorded in ``vocab_growth`` (base size and added characters per growth).
    """
    old = vocab_of(ckpt)
    vocab = old.grow(cps)
    added = list(vocab.chars[len(old):])
    if not added:
        return ckpt, []
    model = dict(ckpt["model"])
    for key in VOCAB_ROWS:
        w = model.get(key)
        if not isinstance(w, torch.Tensor) or w.dim() < 1 or w.shape[0] != len(old):
            raise CheckpointError(f"checkpoint weights do not fit its vocabulary ({key})")
        mean = w.float().mean(0, keepdim=True).to(w.dtype)  # (1, ...)
        model[key] = torch.cat([w, mean.expand(len(added), *w.shape[1:])])
    growth = [*growth_of(ckpt), {"base_size": len(old), "added": "".join(added)}]
    return {**ckpt, "vocab": list(vocab.chars), "model": model, "vocab_growth": growth}, added


def growth_of(ckpt: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The vocabulary growths recorded in a checkpoint (none for an ungrown model)."""
    growth = (ckpt or {}).get("vocab_growth")
    if not isinstance(growth, list):
        return []
    return [g for g in growth if isinstance(g, dict) and isinstance(g.get("base_size"), int)
            and isinstance(g.get("added"), str)]


def shape_differences(old: Config, new: Config) -> list[str]:
    """Model fields that differ between two configs and would change parameter shapes."""
    return [
        f"model.{name} {getattr(old.model, name)!r} -> {getattr(new.model, name)!r}"
        for name in SHAPE_FIELDS
        if getattr(old.model, name) != getattr(new.model, name)
    ]
