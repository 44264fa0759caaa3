"""Recognising a web page written by ``charlm export --format html`` where a model file is
expected: its model card, read from the page's JSON data block, names what the page holds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from charlm.errors import CheckpointError

PAGE_FORMAT = "charlm-web"
MAX_PAGE_BYTES = 100_000_000


def describe_page(path: str | Path) -> dict[str, Any] | None:
    """The model card of a page written by :func:`export_html`, or None when the file is not
    one (read at most the first MAX_PAGE_BYTES)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PAGE_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    found = re.search(r'<script type="application/json" id="charlm-model">(.*?)</script>', text, re.S)
    if not found:
        return None
    try:
        meta = json.loads(found.group(1))
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("format") != PAGE_FORMAT:
        return None
    return meta.get("card") if isinstance(meta.get("card"), dict) else {}


def page_error(path: str | Path) -> CheckpointError:
    """The one-line error for a web page given where a checkpoint is needed."""
    c = describe_page(path)
    if c is None:
        return CheckpointError(f"{path} is an HTML file, not a charlm checkpoint")
    what = ", ".join(str(x) for x in (
        f"{c.get('cell')} {c.get('hidden_size')} x {c.get('num_layers')}",
        f"{c.get('parameters', 0):,} parameters" if isinstance(c.get("parameters"), int) else None,
        f"{c.get('weights')} weights", f"trained on {c.get('train_file')!r}",
    ) if x)
    return CheckpointError(
        f"{path} is a charlm web page ({what}), which runs in a browser, not a checkpoint; "
        "use the .pt checkpoint it was exported from"
    )
