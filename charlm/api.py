"""The Python API: ``charlm.load(path)`` gives a :class:`Model` that generates and evaluates,
``charlm.train(path, **overrides)`` trains. The ``charlm`` command calls these same functions
(``sample`` and ``eval`` through :func:`load`), so the API and the command give the same text
and the same numbers. Nothing here imports torch until a model is loaded or trained.

    import charlm
    model = charlm.load("runs/input-gru/best.pt")
    print(model.generate("ROMEO:", length=200, temperature=0.8, random_seed=1)[0])
    print(model.evaluate(pathlib.Path("other.txt")).bpc)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from charlm.errors import ArgumentTypeError, CharlmError, ConfigError, check_type, printable


class Model:
    """A trained model, ready to sample from and to evaluate.

    Attributes: ``path`` (the file it came from), ``config`` (a :class:`charlm.config.Config`),
    ``vocab`` (a :class:`charlm.data.vocab.Vocab`), ``device`` (``"onnxruntime"`` for an ONNX export)
    and ``network`` (the ``torch.nn.Module``, or the onnxruntime session wrapper).
    """

    def __init__(self, network: Any, vocab: Any, config: Any, path: Path, device: str,
                 sampler: Callable[..., list[str]]):
        self.network, self.vocab, self.config = network, vocab, config
        self.path, self.device, self._sampler = path, device, sampler

    def __repr__(self) -> str:
        m = self.config.model
        return (f"charlm.Model({str(self.path)!r}: {m.cell} {m.hidden_size} x {m.num_layers}, "
                f"{len(self.vocab)} characters, on {self.device})")

    def seed_text(self, seed: str, drop_unknown: bool = False) -> str:
        """The seed as the model continues it: characters outside the vocabulary are an
        error listing them, or, with ``drop_unknown``, dropped."""
        from charlm.sampling.options import seed_ids

        return self.vocab.decode(seed_ids(self.vocab, seed, drop_unknown))

    def generate(
        self,
        seed: str = "",
        length: int = 500,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        random_seed: int | None = None,
        *,
        drop_unknown: bool = False,
        include_seed: bool = True,
        on_step: Callable[[list[int]], None] | None = None,
        **options: Any,
    ) -> list[str]:
        """``num_samples`` texts of ``length`` generated characters after ``seed``, as
        ``charlm sample`` prints them (each begins with the seed unless ``include_seed`` is
        False). ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off; the same
        ``random_seed`` gives the same text. ``on_step`` receives the new ids (one per sample)
        after each step. Other keyword ``options`` go to the sampler unchanged."""
        from charlm.sampling.options import check_options, seed_ids

        check_type("seed", seed, "str")
        check_options(length, temperature, top_k, top_p, num_samples, random_seed)
        check_type("drop_unknown", drop_unknown, "bool")
        check_type("include_seed", include_seed, "bool")
        check_type("on_step", on_step, "callable")
        _check_sampler_options(options)
        # numpy numbers (np.int64, np.float32) as the Python numbers the samplers expect
        length, top_k, top_p, num_samples = int(length), int(top_k), float(top_p), int(num_samples)
        temperature = ([float(t) for t in temperature] if isinstance(temperature, list | tuple)
                       else float(temperature))
        random_seed = None if random_seed is None else int(random_seed)
        ids = seed_ids(self.vocab, seed, drop_unknown)
        texts = self._sampler(self.network, self.vocab, ids, length, temperature, top_k, top_p,
                              num_samples, random_seed, on_step, **options)
        prefix = self.vocab.decode(ids) if include_seed else ""
        return [prefix + text for text in texts]

    def evaluate(self, text_or_path: str | os.PathLike, *, encoding: str = "utf-8",
                 errors: str = "strict", precision: str = "fp32", unknown: str = "drop",
                 on_progress: Callable[[int, int], None] | None = None):
        """Mean loss over a text, as ``charlm eval`` computes it: returns an
        :class:`charlm.evaluate.EvalResult` with ``loss`` (nats/char), ``bpc`` (bits/char),
        ``perplexity``, ``chars`` and ``unknown`` (characters outside the vocabulary: dropped,
        or with ``unknown="charge"`` each counted at ``charlm.evaluate.UNKNOWN_BITS``).
        ``on_progress(done, total)`` follows the characters evaluated.

        A ``pathlib.Path`` (any path-like), or a one-line ``str`` naming an existing file, is
        read as a file (``encoding``, ``errors`` as for training); any other ``str`` is the
        text itself."""
        from charlm.evaluate import evaluate_model

        for name, value in (("encoding", encoding), ("errors", errors), ("precision", precision),
                            ("unknown", unknown)):
            check_type(name, value, "str")
        check_type("on_progress", on_progress, "callable")
        if self.device == "onnxruntime":
            raise CharlmError(f"{self.path} is an ONNX export, which can only sample; "
                              "evaluate the .pt checkpoint or a .safetensors export")
        text: str | Path
        if isinstance(text_or_path, os.PathLike):
            text = Path(text_or_path)
        elif isinstance(text_or_path, str):
            one_line = "\n" not in text_or_path and "\0" not in text_or_path
            text = Path(text_or_path) if one_line and os.path.isfile(text_or_path) else text_or_path
        else:
            raise TypeError(f"evaluate() takes a str or a path, not {type(text_or_path).__name__}")
        return evaluate_model(self.network, self.vocab, text, precision, encoding, errors,
                              unknown, on_progress, newline=self.config.data.newline)


def _check_sampler_options(options: dict[str, Any]) -> None:
    """``stop`` (a list of texts) and ``beam`` (a width), the sampler's keyword options."""
    stop = options.get("stop", ())
    if isinstance(stop, str) or not isinstance(stop, list | tuple):
        raise ArgumentTypeError(f"stop must be a list of strings (stop=[...]), not "
                                f"{type(stop).__name__} {printable(repr(stop))[:60]}")
    for text in stop:
        check_type("each stop text", text, "str")
    if "beam" in options:
        check_type("beam", options["beam"], "int")
        if not 0 <= options["beam"] <= 4096:
            raise ConfigError(f"beam must be in [0, 4096] (0: sample); got {options['beam']}")


def load(path: str | os.PathLike, device: str = "cpu") -> Model:
    """The model in a file that ``charlm sample -c`` reads: a ``.pt`` checkpoint, a
    ``.safetensors`` export, or an ``.onnx`` export (onnxruntime and numpy only, on the CPU;
    it samples but does not evaluate). ``device``: cpu (default, the fastest for sampling one
    stream), auto, cuda, cuda:N or mps."""
    if not isinstance(path, str | os.PathLike):
        raise ArgumentTypeError(f"path must be a str or a path, not {type(path).__name__}")
    check_type("device", device, "str")
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        # onnxruntime and numpy only: this path never imports torch.
        from charlm.storage import onnx as onnx_runtime

        if device not in ("cpu", "auto"):
            raise CharlmError("an ONNX model runs on the CPU with onnxruntime; drop --device")
        net = onnx_runtime.load(path)
        return Model(net, net.vocab, net.config, path, "onnxruntime", onnx_runtime.generate)
    from charlm.device import resolve_device
    from charlm.sampling.sampler import generate
    from charlm.storage import checkpoint

    ckpt = checkpoint.read(path)
    config = checkpoint.config_of(ckpt)
    dev = resolve_device(device, config.model.cell)
    return Model(checkpoint.model_of(ckpt, dev), checkpoint.vocab_of(ckpt), config, path,
                 str(dev), generate)
