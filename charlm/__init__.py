"""charlm: character-level RNN/LSTM/GRU language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("charlm")  # one source: pyproject.toml, as installed
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
