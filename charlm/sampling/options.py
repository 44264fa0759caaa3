"""Sampling options and seed text, shared by the PyTorch sampler (sample.py) and the
onnxruntime one (onnx_runtime.py). Plain Python and numpy only: no torch here, so sampling an
ONNX export works where torch is not installed."""

from __future__ import annotations

from charlm.data.vocab import Vocab
from charlm.errors import CharlmError, ConfigError, check_type


def seed_ids(vocab: Vocab, seed: str, drop_unknown: bool = False) -> list[int]:
    """Ids of the seed text; unknown characters are an error listing them, or dropped."""
    missing = vocab.unknown_chars(seed) if seed else []
    if missing and not drop_unknown:
        shown = ", ".join(repr(c) for c in missing[:20])
        raise CharlmError(
            f"seed has characters not in the model's vocabulary: {shown}; "
            "pass --drop-unknown to drop them"
        )
    if missing:
        seed = "".join(c for c in seed if c not in set(missing))
    return vocab.encode(seed).tolist() if seed else []


def start_ids(vocab: Vocab, seed: list[int]) -> list[int]:
    """The ids to warm the state on: the seed, or, for an empty seed, a newline (where text
    usually starts), or id 0 when the vocabulary has no newline."""
    if seed:
        return seed
    return [vocab.chars.index("\n") if "\n" in vocab.chars else 0]


# Generated ids are held in memory until the end: bound the total number of characters.
MAX_CHARS = 100_000_000


def check_options(length: int, temperature: float | list[float], top_k: int, top_p: float,
                  num_samples: int, random_seed: int | None = None):
    """The sampling options' types (the Python API's names: ``length=1.5`` is an
    ArgumentTypeError, a TypeError) and ranges (ConfigError, exit 2, with the options' names)."""
    check_type("length", length, "int")
    temps = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature]
    for t in temps:
        check_type("temperature", t, "number")
    check_type("top_k", top_k, "int")
    check_type("top_p", top_p, "number")
    check_type("num_samples", num_samples, "int")
    if random_seed is not None:
        check_type("random_seed", random_seed, "int")
    if not 0 <= length <= MAX_CHARS:
        raise ConfigError(f"--length must be in [0, {MAX_CHARS}]; got {length}")
    for t in temps:
        if not 0.0 <= t <= 100.0:
            raise ConfigError(f"--temperature must be in [0, 100]; got {t}")
    if not 1 <= len(temps) <= 64:
        raise ConfigError(f"give 1 to 64 temperatures; got {len(temps)}")
    num_samples_all = num_samples * len(temps)
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off); got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1]; got {top_p}")
    if not 1 <= num_samples <= 65536:
        raise ConfigError(f"--num-samples must be in [1, 65536]; got {num_samples}")
    if length * num_samples_all > MAX_CHARS:
        raise ConfigError(
            f"--num-samples x --length x temperatures is {num_samples_all * length:,} "
            f"characters, more than "
            f"{MAX_CHARS:,}; generate fewer or shorter samples"
        )
    if random_seed is not None and not 0 <= random_seed < 2**63:
        raise ConfigError(f"--random-seed must be in [0, 2**63 - 1]; got {random_seed}")


# A seed is read whole (and the model warmed on all of it): bound the bytes read, so that
# ``--seed-file /dev/zero`` or an endless standard input stops at once.
MAX_SEED_BYTES = 16 << 20


def read_seed_file(path: str, encoding: str = "utf-8") -> str:
    """The text of a seed file, or of standard input for ``-``; at most MAX_SEED_BYTES bytes
    are read, and a longer input is refused. Errors are one-line CharlmErrors (missing file, a
    directory, undecodable bytes, too long)."""
    import sys

    if path == "-" and sys.stdin is None:  # started with <&-
        raise CharlmError("standard input is closed; --seed-file - reads the text from it "
                          "(give a file, or the text with --seed)")
    name = "(stdin)" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_SEED_BYTES + 1)
        else:
            with open(path, "rb") as f:  # bytes as they are: "\r\n" is kept, as in training
                data = f.read(MAX_SEED_BYTES + 1)
        if len(data) > MAX_SEED_BYTES:
            raise CharlmError(
                f"seed file {name} is longer than {MAX_SEED_BYTES >> 20} MiB; pass its end "
                "instead (e.g. tail -c 100000 FILE | charlm sample --seed-file - ...)"
            )
        text = data.decode(encoding)
    except FileNotFoundError:
        raise CharlmError(f"seed file not found: {path}") from None
    except IsADirectoryError:
        raise CharlmError(f"seed file is a directory: {path}") from None
    except UnicodeDecodeError as exc:
        raise CharlmError(f"seed file {name} is not valid {encoding} (byte {exc.start})") from None
    except (OSError, LookupError) as exc:
        raise CharlmError(f"cannot read seed file {path}: {exc}") from None
    return text


def parse_temperatures(values: list[str] | None, default: float = 0.8) -> list[float]:
    """Temperatures from repeated options and comma-separated lists: ``["0.5", "1,1.5"]``
    gives ``[0.5, 1.0, 1.5]``; none given gives ``[default]``."""
    temps: list[float] = []
    for value in values or []:
        for part in value.split(","):
            try:
                temps.append(float(part))
            except ValueError:
                raise ConfigError(
                    f"--temperature takes numbers like 0.8 or 0.5,1.0; got {value!r}"
                ) from None
    return temps or [default]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r`` and ``\\`` in a stop text given on the command line, so that
    ``--stop '\n\n'`` means a blank line; any other backslash is kept as typed."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def check_stops(vocab: Vocab, stops: list[str]) -> None:
    """A stop text with a character outside the vocabulary could never end a sample."""
    for s in stops:
        if not s:
            raise ConfigError("--stop texts must not be empty")
        missing = vocab.unknown_chars(s)
        if missing:
            shown = ", ".join(repr(c) for c in missing[:20])
            raise CharlmError(
                f"--stop text {s!r} has characters not in the model's vocabulary ({shown}), "
                "so it can never occur"
            )


class StopScan:
    """Where each of ``num_rows`` generated texts first contains one of the ``stops`` texts.

    Only the generated text is searched (not the seed). Feed the new characters of every row
    after each step; ``ends[i]`` is then the length of row i up to and including its first
    stop text, or None while it has none.
    """

    def __init__(self, stops: list[str], num_rows: int):
        if any(not s for s in stops):
            raise CharlmError("--stop texts must not be empty")
        self.stops = list(stops)
        self.keep = max(len(s) for s in stops) if stops else 0
        self.tails = [""] * num_rows
        self.ends: list[int | None] = [None] * num_rows
        self.length = 0

    def feed(self, chars: list[str]) -> bool:
        """Add one character per row; returns True once every row has reached a stop."""
        self.length += 1
        for i, c in enumerate(chars):
            if self.ends[i] is None:
                tail = (self.tails[i] + c)[-self.keep:]
                self.tails[i] = tail
                if any(tail.endswith(s) for s in self.stops):
                    self.ends[i] = self.length
        return all(e is not None for e in self.ends)

    def cut(self, i: int, text: str) -> str:
        end = self.ends[i]
        return text if end is None else text[:end]


def check_beam(beam: int, temperatures: list[float], top_k: int, top_p: float,
               num_samples: int, random_seed: int | None, temperature_given: bool,
               onnx: bool = False) -> None:
    """Beam search is deterministic and returns one text: options that choose among random
    samples or ask for several results make no sense with it."""
    if beam == 0:
        return
    if not 1 <= beam <= 4096:
        raise ConfigError(f"--beam must be in [1, 4096]; got {beam}")
    if onnx:
        raise CharlmError(BEAM_NEEDS_TORCH)
    clash = [name for name, on in (
        ("--temperature", temperature_given or len(temperatures) > 1),
        ("--top-k", top_k != 0), ("--top-p", top_p != 1.0),
        ("--num-samples", num_samples != 1), ("--random-seed", random_seed is not None),
    ) if on]
    if clash:
        raise ConfigError(
            f"--beam finds the single most likely text; it does not combine with {', '.join(clash)}"
        )


BEAM_NEEDS_TORCH = "--beam needs the .pt or .safetensors model; an ONNX export samples only"


def check_interactive(interactive: bool, keep_state: bool, seed: str, seed_file: str | None,
                      beam: int, num_samples: int, temperatures: list[float], onnx: bool) -> None:
    """The interactive mode continues one typed line at a time, from the PyTorch model."""
    if keep_state and not interactive:
        raise ConfigError("--keep-state only applies with --interactive")
    if not interactive:
        return
    clash = [name for name, on in (
        ("--seed", bool(seed)), ("--seed-file", seed_file is not None), ("--beam", beam > 0),
        ("--num-samples", num_samples != 1), ("several temperatures", len(temperatures) > 1),
        ("an ONNX model", onnx),
    ) if on]
    if clash:
        raise ConfigError("--interactive continues the lines you type, one at a time; it does "
                          f"not combine with {', '.join(clash)}")


def sample_labels(temperatures: list[float], num_samples: int) -> list[str]:
    """The heading of each sample, in the order :func:`charlm.sampling.sampler.generate` returns them."""
    labels = []
    for t in temperatures:
        for i in range(num_samples):
            label = f"sample {i + 1}"
            if len(temperatures) > 1:
                label = f"temperature {t:g}" + (f", {label}" if num_samples > 1 else "")
            labels.append(label)
    return labels
