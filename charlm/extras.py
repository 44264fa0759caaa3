"""Optional dependencies, imported where they are used: a missing one is a one-line error that
says which extra to install, not an ImportError traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from charlm.errors import CharlmError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a CharlmError naming the ``charlm[extra]`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise CharlmError(
            f"{purpose} needs the {package!r} package, which is not installed: "
            f'pip install "charlm[{extra}]"'
        ) from None
