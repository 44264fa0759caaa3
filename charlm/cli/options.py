"""The typed options of ``charlm train``, made from the config fields that have a flag
(charlm.config.SETTINGS): each one's flag, type, help text and default are declared once, on
its field, and a new field with a flag is a new option without an edit here."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape


def _parameter(s) -> inspect.Parameter:
    flag = f"{s.flag}/--no-{s.flag[2:]}" if s.kind is bool else s.flag
    # A bool shows its default as the flag that gives it, as typer does for a pair.
    shown = (s.flag if s.default else f"--no-{s.flag[2:]}")[2:] if s.kind is bool \
        else s.default_text()
    option = typer.Option(flag, help=escape(s.help), show_default=shown)
    # None: not given, so that a --config file's value stands.
    return inspect.Parameter(s.option, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                             annotation=Annotated[s.kind | None, option])


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Put the typed option of every config field with a flag in the place of ``func``'s
    parameter ``options``; typer then calls ``func`` with them gathered in that one dict,
    by parameter name (``{"seq_len": 64, "random_seed": None, ...}``; None: not given), as
    charlm.config.apply_options takes them."""
    from charlm.config import OPTIONS

    signature = inspect.signature(func, eval_str=True)
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("options")
    generated = [_parameter(s) for s in OPTIONS.values()]
    clash = {p.name for p in params} & set(OPTIONS)
    if clash:
        raise TypeError(f"{func.__name__} declares config options itself: {sorted(clash)}")
    params[at:at + 1] = generated

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        options = {name: kwargs.pop(name) for name in OPTIONS}
        return func(*args, options=options, **kwargs)

    command.__signature__ = signature.replace(parameters=params)
    return command
