"""charlm's version, read once from the installed metadata (pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("charlm")  # one source: pyproject.toml, as installed
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
