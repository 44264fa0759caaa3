"""The web page of charlm: one UI (ui.html, ui.css, ui.js) shared by two back ends, the model
inside the page (``charlm export --format html``, model.js) and ``charlm serve``'s server.

:func:`page` assembles one self-contained HTML document. Nothing from a model or a user is
ever written into the page as markup: names go through :func:`html.escape`, data through
:func:`json_for_html` into ``<script type="application/json">`` blocks (never executed), and the
UI puts every string into the document with ``textContent``. A Content-Security-Policy meta
tag allows only the page's own inline scripts and style (by their sha256 hashes), so even
markup that slipped through could not run a script, and ``connect-src`` (``'none'`` for an
exported page) decides whether the page may make any request at all.

The back-end interface that ui.js calls (``window.charlmBackend``, set by ``backend_js``)::

    card() -> Promise<object>        # the model card: cell, sizes, parameters, ...
    generate(prompt, options, onText, signal) -> Promise<string>
        # options {length, temperature, top_k, top_p, seed, stop}; onText(chunk) streams;
        # signal: AbortSignal (resolve with the text so far); resolves to the generated text
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from importlib import resources
from typing import Any

UI_FILES = ("ui.html", "ui.css", "ui.js", "model.js")


def read(name: str) -> str:
    """The text of one of the page's files (package data of charlm.web)."""
    if name not in UI_FILES:
        raise ValueError(f"not a file of the charlm page: {name!r}")
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def json_for_html(obj: Any) -> str:
    """``obj`` as JSON that is safe inside a ``<script>`` element: ASCII only (so any
    character, astral ones as surrogate pairs, survives any page encoding), with ``<``, ``>``
    and ``&`` escaped, so no ``</script>`` or ``<!--`` can end or change the element."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode() + "'"


def _inline_script(source: str) -> str:
    # A script's own text must not hold "</script" (it would end the element early); the page's
    # scripts are ours, so this guards against an edit, not against input.
    if "</script" in source.lower() or "<!--" in source:
        raise ValueError("an inline script may not contain '</script' or '<!--'")
    return f"<script>{source}</script>"


def page(backend_js: str, *, title: str, connect_src: str = "'none'",
         data: dict[str, Any] | None = None, raw_data: dict[str, str] | None = None) -> str:
    """One self-contained HTML page: the UI, then ``data`` (id -> JSON-able value, each a
    ``<script type="application/json" id=...>`` block), ``raw_data`` (id -> text of the
    characters A-Z a-z 0-9 + / = only, e.g. base64 weights, in a
    ``<script type="application/octet-stream">`` block), then ``backend_js`` (which must set
    ``window.charlmBackend``), then ui.js. ``title`` is plain text (escaped here)."""
    style = read("ui.css")
    scripts = [backend_js, read("ui.js")]
    blocks = []
    for name, value in (data or {}).items():
        blocks.append(f'<script type="application/json" id="{html.escape(name)}">'
                      f"{json_for_html(value)}</script>")
    for name, text in (raw_data or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9+/=]*", text):
            raise ValueError(f"raw data block {name!r} holds characters other than base64's")
        blocks.append(f'<script type="application/octet-stream" id="{html.escape(name)}">'
                      f"{text}</script>")
    csp = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(_sha256(s) for s in scripts),
        "style-src " + _sha256(style),
        f"connect-src {connect_src}",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
    ])
    fields = {
        "{{CSP}}": html.escape(csp, quote=False).replace("\"", "&quot;"),
        "{{TITLE}}": html.escape(title),
        "{{STYLE}}": style,
        "{{DATA}}": "\n".join(blocks),
        "{{SCRIPTS}}": "\n".join(_inline_script(s) for s in scripts),
    }
    out = read("ui.html")
    # One pass over the template, so that no field's value is searched for other fields.
    parts = []
    rest = out
    while "{{" in rest:
        before, _, after = rest.partition("{{")
        key, _, rest = after.partition("}}")
        parts.append(before)
        parts.append(fields["{{" + key + "}}"])
    parts.append(rest)
    return "".join(parts)
