"""charlm: character-level RNN/LSTM/GRU language models.

The Python API (README, "Python API"); ``import charlm`` stays light: torch is imported only
when a model is loaded or trained.

    charlm.load(path, device="cpu") -> charlm.Model   .generate(...), .evaluate(...)
    charlm.train(path=None, config=None, out=None, **overrides) -> TrainResult
    charlm.tiny_shakespeare() -> Path of the bundled corpus
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("charlm")  # one source: pyproject.toml, as installed
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["Model", "load", "train", "tiny_shakespeare", "__version__"]

_LAZY = {"Model": "charlm.api", "load": "charlm.api", "tiny_shakespeare": "charlm.corpus"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name == "train":  # the module charlm.train, which is callable (charlm.train.run)
        return import_module("charlm.train")
    raise AttributeError(f"module 'charlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
