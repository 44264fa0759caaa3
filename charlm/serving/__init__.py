"""``charlm serve``: trained models behind an OpenAI-compatible HTTP API (the completions
shape), many clients stepped together in one batched model step per character, and the
charlm page at ``/``.

* :mod:`charlm.serving.models` loads the models by name (the files ``charlm sample -c`` takes).
* :mod:`charlm.serving.batcher` steps every active stream of a model together.
* :mod:`charlm.serving.app` is the ASGI app (Starlette) and :func:`serve` runs it with uvicorn.

Starlette and uvicorn are the ``serve`` extra: ``pip install "charlm[serve]"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Started:
    """What a server says when it starts: its URL, its models (name -> file), its limits,
    whether it listens on every interface, and whether it needs a key."""

    url: str
    models: dict[str, Path]
    limits: Any  # charlm.serving.app.Limits
    all_interfaces: bool
    api_key: bool


def serve(paths: list[os.PathLike | str], named: list[str] | None = None, *,
          host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          api_key: str | None = None, limits: Any = None, threads: int = 0,
          on_start: Callable[[Started], None] | None = None,
          log: Callable[[str], None] | None = None) -> None:
    """Serve models until SIGTERM or Ctrl-C. ``paths``: checkpoints, exports or run
    directories (named after the run or the file); ``named``: ``NAME=PATH`` texts; with
    neither, the newest run under runs/. ``api_key`` (or CHARLM_API_KEY): required as
    ``Authorization: Bearer KEY``. ``threads``: torch's CPU threads (0: one CPU fewer than
    this process may use, at least 1: the other one serves HTTP). ``on_start`` is called once
    the port is bound, ``log`` with one line per request (None: no access log)."""
    from charlm.extras import require

    require("starlette", "serve", "charlm serve")
    require("uvicorn", "serve", "charlm serve")
    from charlm.runs.directory import checkpoint_in, latest_checkpoint
    from charlm.serving import app
    from charlm.serving.models import load_models, model_name, parse_model_option

    limits = limits if limits is not None else app.Limits()
    limits.check()
    if not 0 <= port <= 65535:
        from charlm.errors import ConfigError

        raise ConfigError(f"--port must be in [0, 65535] (0: any free port); got {port}")
    key = app.api_key_from(api_key)
    if not 0 <= threads <= 4096:
        from charlm.errors import ConfigError

        raise ConfigError(f"--threads must be in [0, 4096] (0: automatic); got {threads}")
    from charlm.device import cpu_count, set_threads

    set_threads(threads or max(1, cpu_count() - 1))
    pairs = [(model_name(checkpoint_in(Path(p))), checkpoint_in(Path(p))) for p in paths]
    for text in named or []:
        name, path = parse_model_option(text)
        pairs.append((name, checkpoint_in(Path(path))))
    if not pairs:
        from charlm.errors import CharlmError

        try:
            found = latest_checkpoint()
        except CharlmError:
            raise CharlmError("no checkpoint found under runs/; pass a run directory or a "
                              "checkpoint (charlm serve runs/NAME), or --model NAME=PATH") from None
        pairs.append((model_name(found), found))
    served = load_models(pairs, device)
    sock = app.listen(host, port)
    try:
        server = app.Server(served, limits, key, log)
        bound = sock.getsockname()[0]
        server.loopback_only = bound.startswith("127.") or bound == "::1"
        if on_start is not None:
            on_start(Started(app.url_of(sock), {s.name: s.path for s in served}, limits,
                             bound in ("0.0.0.0", "::"), key is not None))
        app.run(server, sock, graceful_seconds=min(limits.timeout, 10.0))
    finally:
        sock.close()
