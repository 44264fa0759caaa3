"""The random numbers of sampling: one stream of uniform numbers per generated text.

Each text (a row of ``charlm sample --num-samples``, a choice of a request to ``charlm serve``)
has a 64-bit key made from the random seed and its row number; its ``t``-th character is drawn
with the uniform number ``u(key, t)``, a counter-based SplitMix64 hash. So a text depends only
on its seed, its row and its own options, never on which other texts share its batch: a seeded
request to the server returns the same text alone or among a hundred others, and the same text
as ``charlm sample`` with that ``--random-seed``. Plain numpy (uint64 arithmetic wraps), so it
is the same on every platform and device, and costs nothing to keep per stream (one integer).
"""

from __future__ import annotations

import os

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROW = np.uint64(0xD1B54A32D192ED03)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def fresh_seed() -> int:
    """A random seed for a sample asked for without one."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def stream_keys(random_seed: int, rows: int, first: int = 0) -> np.ndarray:
    """The keys (uint64, (rows,)) of rows ``first`` .. ``first + rows - 1`` of a sample with
    this random seed (0 <= seed < 2**64)."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([random_seed % 2**64], dtype=np.uint64) + _GOLDEN)
        index = np.arange(first + 1, first + rows + 1, dtype=np.uint64)
        return _mix(base + index * _ROW)


def uniforms(keys: np.ndarray, steps: np.ndarray | int) -> np.ndarray:
    """The uniform numbers in [0, 1) (float64, one per key) for character ``steps`` (one per
    key, or one for all) of the texts with these keys."""
    with np.errstate(over="ignore"):
        t = np.asarray(steps, dtype=np.uint64) + np.uint64(1)
        bits = _mix(keys + t * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
