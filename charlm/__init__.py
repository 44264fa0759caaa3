"""charlm: character-level RNN/LSTM/GRU language models.

The Python API (docs/python-api.md); ``import charlm`` stays light: torch is imported only
when a model is loaded or trained.

    charlm.load(path, device="cpu") -> charlm.Model   .generate(...), .evaluate(...)
    charlm.train(path=None, config=None, out=None, resume=None, init_from=None, grow_vocab=False,
                 dry_run=False, ..., **overrides) -> TrainResult (a DryRun with dry_run)
    charlm.tiny_shakespeare() -> Path of the bundled corpus
"""

from importlib import import_module

from charlm._version import __version__

__all__ = ["Model", "load", "train", "tiny_shakespeare", "__version__"]

_LAZY = {"Model": "charlm.api", "load": "charlm.api", "tiny_shakespeare": "charlm.data.corpus"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name == "train":  # a plain function: charlm.train(path, config=None, out=None, **overrides)
        return import_module("charlm.training.request").run
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
