"""What ``charlm sample`` asks for, checked and made ready by one function, :func:`prepare`:
the options and how they combine, the seed text (``--seed`` or ``--seed-file``, its line
endings read as the model's text was, characters outside the vocabulary dropped or refused),
the stop texts, the checkpoint (default: the newest run's) loaded with :func:`charlm.api.load`,
and the interactive session. The command then only streams the samples it gets.

What the command says on the way comes back through ``on_note(text, minor)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charlm.errors import CharlmError, ConfigError, printable
from charlm.sampling.options import (
    check_beam,
    check_interactive,
    check_options,
    check_stops,
    parse_temperatures,
    read_seed_file,
    sample_labels,
    seed_ids,
    unescape,
)


@dataclass
class SampleRequest:
    """The options of ``charlm sample``, as given."""

    checkpoint: Path | None = None  # a file or run directory; None: the newest run's
    seed: str = ""
    seed_file: str | None = None  # a path, or "-" for standard input
    length: int = 500
    temperature: list[str] | None = None  # as typed: ["0.5", "1"] or ["0.5,1"]; None: 0.8
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    random_seed: int | None = None
    stop: list[str] = field(default_factory=list)  # as typed: "\\n" is a newline
    beam: int = 0
    drop_unknown: bool = False
    no_echo: bool = False
    interactive: bool = False
    keep_state: bool = False
    device: str = "auto"


@dataclass
class Prepared:
    """What to generate: from ``model``, after ``seed_text`` (ids ``ids``), printing ``echo``
    (the seed as typed, or nothing) before each sample; or, interactive, the ``session``."""

    request: SampleRequest
    model: Any  # charlm.api.Model
    checkpoint: Path
    temperatures: list[float]
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    seed_text: str = ""
    echo: str = ""
    labels: list[str] = field(default_factory=list)  # one heading a sample (several: printed)
    session: Any = None  # charlm.sampling.interactive.Session, with --interactive

    def samples(self, on_step: Callable[[list[int]], None] | None = None) -> list[str]:
        """The samples' continuations, one per temperature and sample (``labels``);
        ``on_step`` gets each step's new ids."""
        q = self.request
        return self.model.generate(self.seed_text, q.length, self.temperatures, q.top_k, q.top_p,
                                   q.num_samples, q.random_seed, include_seed=False,
                                   on_step=on_step, stop=self.stops)

    def beam_search(self):
        """``--beam``: the most likely continuation (a charlm.sampling.beam result)."""
        from charlm.sampling.beam import beam_search

        return beam_search(self.model.network, self.model.vocab, self.ids, self.request.length,
                           self.request.beam, stop=self.stops)


def prepare(request: SampleRequest, on_note: Callable[..., None]) -> Prepared:
    """Check ``request`` and load its model; errors are one-line CharlmErrors naming the
    options, in the order the command has always reported them."""
    from charlm.api import load
    from charlm.runs.directory import checkpoint_in, latest_checkpoint

    q = request
    temps = parse_temperatures(q.temperature)
    onnx = q.checkpoint is not None and q.checkpoint.suffix.lower() == ".onnx"
    check_options(q.length, temps, q.top_k, q.top_p, q.num_samples, q.random_seed)
    check_beam(q.beam, temps, q.top_k, q.top_p, q.num_samples, q.random_seed,
               q.temperature is not None, onnx)
    check_interactive(q.interactive, q.keep_state, q.seed, q.seed_file, q.beam, q.num_samples,
                      temps, onnx)
    if q.interactive and sys.stdin is None:  # started with <&-
        raise CharlmError("standard input is closed; --interactive reads the lines to continue "
                          "from it (or give the text with --seed)")
    stops = [unescape(text) for text in q.stop]
    seed = q.seed
    if q.seed_file is not None:
        if seed:
            raise ConfigError("--seed and --seed-file cannot be used together")
        seed = read_seed_file(q.seed_file)
    if q.checkpoint is None:
        path = latest_checkpoint()
        on_note(f"using {printable(path)}", minor=True)
    else:
        path = checkpoint_in(q.checkpoint)
        if path != q.checkpoint:
            on_note(f"using {path}", minor=True)
    lm = load(path, q.device)  # what the Python API's charlm.load() gives
    if q.seed_file is not None and lm.config.data.newline == "normalize":
        # Line endings as the model's training text was read: CRLF and CR become "\n".
        seed = seed.replace("\r\n", "\n").replace("\r", "\n")
    check_stops(lm.vocab, stops)
    ready = Prepared(q, lm, path, temps, stops)
    if q.interactive:
        from charlm.sampling.interactive import Session

        ready.session = Session(lm.network, lm.vocab, q.length, temps[0], q.top_k, q.top_p,
                                q.random_seed, stops, q.keep_state, q.drop_unknown)
        return ready
    ready.ids = seed_ids(lm.vocab, seed, q.drop_unknown)
    if q.drop_unknown and len(ready.ids) != len(seed):
        dropped = len(seed) - len(ready.ids)
        on_note(f"dropped {dropped} seed character{'s' * (dropped != 1)} outside the vocabulary")
        seed = lm.vocab.decode(ready.ids)  # what the model continues from
    ready.seed_text = lm.vocab.decode(ready.ids)
    # A file can be long: only what the model adds is printed.
    ready.echo = "" if q.seed_file is not None or q.no_echo else seed
    if q.num_samples > 1 and 0.0 in temps:
        on_note(f"note: temperature 0 is greedy: its {q.num_samples} samples are identical")
    ready.labels = sample_labels(temps, q.num_samples)
    return ready
