"""The default corpus: tiny Shakespeare, shipped inside the package, so ``charlm train`` with no
FILE works offline, from any directory, in an editable checkout and in an installed wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from charlm.errors import CharlmError

# Where the bundled copy comes from (karpathy/char-rnn), for the record; charlm never fetches it.
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_SIZE = 1_115_394


def tiny_shakespeare() -> Path:
    """The path of the bundled tiny Shakespeare (package data ``charlm/corpora``)."""
    ref = resources.files("charlm.data") / "corpora" / "tinyshakespeare.txt"
    # pip installs packages as plain files, so the resource is a real path; a zipped install
    # would need a copy, which no supported install produces.
    if not isinstance(ref, Path) or not ref.is_file():
        raise CharlmError(
            f"the bundled tiny Shakespeare is missing from this installation ({ref}); "
            "reinstall charlm, or pass a text file to train on"
        )
    return ref


def default_corpus() -> Path:
    """What ``charlm train`` trains on when given no FILE."""
    return tiny_shakespeare()
