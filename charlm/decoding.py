"""Sampling options and seed text, shared by the PyTorch sampler (sample.py) and the
onnxruntime one (onnx_runtime.py). Plain Python and numpy only: no torch here, so sampling an
ONNX export works where torch is not installed."""

from __future__ import annotations

from charlm.errors import CharlmError
from charlm.vocab import Vocab


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


def check_options(length: int, temperature: float, top_k: int, top_p: float, num_samples: int,
                  random_seed: int | None = None):
    if not 0 <= length <= MAX_CHARS:
        raise CharlmError(f"--length must be in [0, {MAX_CHARS}]; got {length}")
    if not 0.0 <= temperature <= 100.0:
        raise CharlmError(f"--temperature must be in [0, 100]; got {temperature}")
    if top_k < 0:
        raise CharlmError(f"--top-k must be >= 0 (0 = off); got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise CharlmError(f"--top-p must be in (0, 1]; got {top_p}")
    if not 1 <= num_samples <= 65536:
        raise CharlmError(f"--num-samples must be in [1, 65536]; got {num_samples}")
    if length * num_samples > MAX_CHARS:
        raise CharlmError(
            f"--num-samples x --length is {num_samples * length:,} characters, more than "
            f"{MAX_CHARS:,}; generate fewer or shorter samples"
        )
    if random_seed is not None and not 0 <= random_seed < 2**63:
        raise CharlmError(f"--random-seed must be in [0, 2**63 - 1]; got {random_seed}")
