"""The page of ``charlm inspect``: one HTML file that needs nothing else.

No request leaves it: the style, the script and the figures (SVG) are inline, and its
Content-Security-Policy allows no connection, no outside resource and no script but its own
(by hash), so even text that got past the escaping could not run. Every string that comes from
the text, the run or the vocabulary is escaped: in the HTML by :func:`html.escape`, in the data
block by JSON with ``<``, ``>`` and ``&`` written as ``\\u`` escapes, and the script puts
characters on the page as text nodes only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from html import escape
from pathlib import Path

from charlm._version import __version__
from charlm.errors import CharlmError, ConfigError
from charlm.files import atomic_write
from charlm.inspect.features import CLASSES

GENERATOR = "charlm inspect"
GATE_COLORS = {"input": "#268bd2", "forget": "#dc322f", "output": "#2aa198",
               "reset": "#268bd2", "update": "#dc322f"}


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _json_block(data: object) -> str:
    """JSON safe inside <script type="application/json">: it cannot end the element."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _shown(text: str) -> str:
    """A snippet of the text for a table cell: newlines and tabs visible, escaped."""
    return _e(text.replace("\n", "\u21b5").replace("\t", "\u21e5"))


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float | int) and math.isfinite(x) else "n/a"


# ------------------------------------------------------------------------------ figures
def _text(x: float, y: float, body: str, cls: str = "tick", anchor: str = "middle",
          transform: str = "") -> str:
    """An SVG text element; ``body`` is already escaped."""
    where = f'transform="{transform}"' if transform else f'x="{x:.1f}" y="{y:.1f}"'
    return f'<text {where} class="{cls}" text-anchor="{anchor}">{body}</text>'


def _frame(x: float, y: float, w: float, h: float) -> str:
    return f'<rect x="{x}" y="{y}" width="{w}" height="{h}" class="frame"/>'


def _scatter(points: list[tuple[float, float, str]], title: str, legend: list[tuple[str, str]]) -> str:
    W = H = 300
    m = 40
    span = W - m - 10

    def X(v: float) -> float:
        return m + v * span

    def Y(v: float) -> float:
        return H - m - v * span

    parts = [f'<svg class="fig" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             f'aria-label="{_e(title)}">',
             _frame(m, 10, span, span)]
    for v in (0, 0.5, 1):
        parts.append(_text(X(v), H - m + 14, f"{v:g}"))
        parts.append(_text(m - 4, Y(v) + 4, f"{v:g}", anchor="end"))
    parts.append(f'<line x1="{X(0)}" y1="{Y(1)}" x2="{X(1)}" y2="{Y(0)}" class="diag"/>')
    for x, y, color in points:
        parts.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{color}" '
                     'fill-opacity="0.6"/>')
    parts.append(_text(m + span / 2, H - 6, "fraction left-saturated (&lt; 0.1)", "label"))
    parts.append(_text(0, 0, "fraction right-saturated (&gt; 0.9)", "label",
                       transform=f"translate(11 {10 + span / 2}) rotate(-90)"))
    for i, (name, color) in enumerate(legend):
        parts.append(f'<circle cx="{X(0.62)}" cy="{22 + 14 * i}" r="4" fill="{color}"/>'
                     f'<text x="{X(0.62) + 8}" y="{26 + 14 * i}" class="tick">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(counts: list[int], title: str) -> str:
    W, H, m = 300, 200, 40
    span_x, span_y = W - m - 10, H - m - 10
    top = max(max(counts), 1)
    bw = span_x / len(counts)
    parts = [f'<svg class="fig" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             f'aria-label="{_e(title)}">', _frame(m, 10, span_x, span_y)]
    for i, c in enumerate(counts):
        h = span_y * c / top
        parts.append(f'<rect x="{m + i * bw + 1:.1f}" y="{10 + span_y - h:.1f}" width="{bw - 2:.1f}" '
                     f'height="{h:.1f}" class="bar"><title>{c:,}</title></rect>')
    for v in (0, 0.5, 1):
        parts.append(_text(m + v * span_x, H - m + 14, f"{v:g}"))
    parts.append(_text(m + span_x / 2, H - 6, _e(title), "label"))
    parts.append("</svg>")
    return "".join(parts)


def _memory_figure(points: list[dict]) -> str:
    W, H, m = 520, 260, 50
    span_x, span_y = W - m - 20, H - m - 20
    finite = [p for p in points if p["k"] is not None]
    unlimited = next(p["loss"] for p in points if p["k"] is None)
    values = [p["loss"] for p in points]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or 0.1
    lo, hi = lo - pad, hi + pad
    n = len(finite) + 1  # the unlimited point sits one step right of the last k

    def X(i: int) -> float:
        return m + span_x * i / (n - 1)

    def Y(v: float) -> float:
        return 20 + span_y * (hi - v) / (hi - lo)

    parts = [f'<svg class="fig" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             'aria-label="memory curve">', _frame(m, 20, span_x, span_y)]
    y_all = Y(unlimited)
    parts.append(f'<line x1="{m}" x2="{m + span_x}" y1="{y_all:.1f}" y2="{y_all:.1f}" class="diag"/>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{X(i):.1f},{Y(p['loss']):.1f}"
                    for i, p in enumerate(finite))
    parts.append(f'<path d="{path}" class="line"/>')
    for i, p in enumerate([*finite, {"k": None, "loss": unlimited}]):
        label = "all" if p["k"] is None else str(p["k"])
        parts.append(f'<circle cx="{X(i):.1f}" cy="{Y(p["loss"]):.1f}" r="3.5" class="dot">'
                     f'<title>k = {label}: {p["loss"]:.4f} nats</title></circle>')
        parts.append(_text(X(i), H - m + 34, label))
    for v in (lo + pad, (lo + hi) / 2, hi - pad):
        parts.append(_text(m - 4, Y(v) + 4, f"{v:.2f}", anchor="end"))
    parts.append(f'<text x="{m + span_x / 2}" y="{H - 2}" class="label" text-anchor="middle">'
                 'characters of context kept (k; "all": the whole text before)</text>')
    parts.append(f'<text transform="translate(12 {20 + span_y / 2}) rotate(-90)" class="label" '
                 'text-anchor="middle">loss, nats/char</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------ the page
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;
color:#222;background:#fff}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
.meta{color:#555}.note{color:#555;font-size:.92em;max-width:60em}
table{border-collapse:collapse;margin:.5em 0}
td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.text{font:13px/1.5 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;
border:1px solid #ddd;padding:8px;max-height:32em;overflow:auto}
.text span{cursor:default}.mark{background:#fdd;font-weight:bold}
code.ctx{white-space:pre;font:12px ui-monospace,monospace}
#tip{position:fixed;display:none;background:#fff;border:1px solid #888;padding:6px 8px;
font:12px ui-monospace,monospace;box-shadow:0 2px 6px #0003;pointer-events:none;
white-space:pre;z-index:9}
.fig{margin:4px 12px 4px 0}.frame{fill:none;stroke:#999}.tick{font-size:10px;fill:#444}
.label{font-size:11px;fill:#222}
.diag{stroke:#bbb;stroke-dasharray:4 3}.bar{fill:#dc322f;fill-opacity:.7}
.line{fill:none;stroke:#268bd2;stroke-width:2}.dot{fill:#268bd2}
tr.pick{cursor:pointer}tr.pick:hover{background:#eef}.figs{display:flex;flex-wrap:wrap}
"""

SCRIPT = r"""
(function(){
"use strict";
var D = JSON.parse(document.getElementById("data").textContent);
var tip = document.getElementById("tip");
function show(c){ return c === "\n" ? "\u21b5\n" : c === "\t" ? "\u21e5\t" : c; }
function name(c){ return c === "\n" ? "\\n" : c === "\t" ? "\\t" : c === " " ? "space" : c; }
function bytes(s){
  var a = atob(s), u = new Uint8Array(a.length);
  for (var i = 0; i < a.length; i++) u[i] = a.charCodeAt(i);
  return u;
}
function fill(el, n, color){
  var frag = document.createDocumentFragment();
  for (var i = 0; i < n; i++){
    var s = document.createElement("span");
    s.textContent = show(D.text[i]);
    s.dataset.i = i;
    s.style.backgroundColor = color(i);
    frag.appendChild(s);
  }
  el.textContent = "";
  el.appendChild(frag);
}
// Surprise: character i (i >= 1) was predicted with D.bits[i - 1] bits.
var chars = Array.from(D.text);
D.text = chars;
var surprise = document.getElementById("surprise");
fill(surprise, chars.length, function(i){
  if (i === 0) return "transparent";
  var a = Math.min(D.bits[i - 1] / 10, 1);
  return "rgba(220,50,47," + a.toFixed(3) + ")";
});
surprise.addEventListener("mousemove", function(ev){
  var i = ev.target.dataset ? ev.target.dataset.i : undefined;
  if (i === undefined) { tip.style.display = "none"; return; }
  i = +i;
  var lines = [];
  if (i === 0) lines.push("the first character: no prediction");
  else {
    var p = 0, ids = D.top_ids[i - 1], ps = D.top_p[i - 1];
    var b = D.bits[i - 1];
    lines.push("actual " + JSON.stringify(name(chars[i])) + ": " + b.toFixed(2) +
               " bits (p = " + Math.pow(2, -b).toFixed(3) + ")");
    lines.push("most likely next:");
    for (var k = 0; k < ids.length; k++) {
      if (ps[k] > 0) lines.push("  " + JSON.stringify(name(D.vocab[ids[k]])) + "  " + ps[k].toFixed(3));
    }
  }
  tip.textContent = lines.join("\n");
  tip.style.display = "block";
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 260) + "px";
  tip.style.top = (ev.clientY + 14) + "px";
});
surprise.addEventListener("mouseleave", function(){ tip.style.display = "none"; });
// Cells: any unit's value over the first D.unit_chars characters.
var cells = document.getElementById("cells");
if (cells) {
  var decoded = {};
  var layer = document.getElementById("layer"), kind = document.getElementById("kind");
  var unit = document.getElementById("unit");
  var info = document.getElementById("unit-info");
  var draw = function(){
    var key = layer.value + kind.value, H = D.hidden;
    var u = Math.max(0, Math.min(H - 1, Math.floor(+unit.value || 0)));
    unit.value = u;
    if (!decoded[key]) decoded[key] = bytes(D.units[key]);
    var q = decoded[key];
    fill(cells, D.unit_chars, function(i){
      var v = q[i * H + u] / 127 - 1;
      return v >= 0 ? "rgba(220,50,47," + v.toFixed(3) + ")"
                    : "rgba(38,139,210," + (-v).toFixed(3) + ")";
    });
    var r = D.r[key], parts = [];
    for (var f = 0; f < D.features.length; f++) parts.push(D.features[f] + " " + r[f][u].toFixed(2));
    info.textContent = "layer " + layer.value + " " + kind.value + "[" + u + "]: r = " +
                       parts.join(", ");
    cells.dataset.unit = key + ":" + u;
  };
  document.getElementById("pick").addEventListener("submit", function(ev){
    ev.preventDefault();
    draw();
  });
  layer.addEventListener("change", draw); kind.addEventListener("change", draw);
  if (D.first) { layer.value = D.first[0]; kind.value = D.first[1]; unit.value = D.first[2]; }
  Array.prototype.forEach.call(document.querySelectorAll("tr.pick"), function(tr){
    tr.addEventListener("click", function(){
      layer.value = tr.dataset.layer; kind.value = tr.dataset.kind; unit.value = tr.dataset.index;
      draw();
    });
  });
  draw();
}
})();
"""


def render(document: dict, page: dict) -> str:
    """The page for an :class:`~charlm.inspect.analysis.Inspection`'s document and page data."""
    d = document
    L, H = d["layers"], d["hidden_size"]
    data = {**page, "hidden": H, "features": list(d["features"])}
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{script_hash}'; style-src 'unsafe-inline'; "
           "img-src data:; base-uri 'none'; form-action 'none'")
    h: list[str] = []
    add = h.append
    add("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
    add(f'<meta http-equiv="Content-Security-Policy" content="{csp}">')
    add(f'<meta name="generator" content="{GENERATOR} {_e(__version__)}">')
    add('<meta name="viewport" content="width=device-width, initial-scale=1">')
    add(f"<title>charlm inspect: {_e(d['run'])}</title><style>{STYLE}</style></head><body>")
    add(f"<h1>What {_e(d['run'])} learned</h1>")
    cut = " (cut: the text goes on; --chars inspects more)" if d["cut"] else ""
    dropped = f"; {d['unknown']:,} outside the vocabulary dropped" if d["unknown"] else ""
    add(f'<p class="meta">{_e(d["cell"].upper())}, {L} layer{"s" * (L > 1)} of {H} units; '
        f'checkpoint {_e(d["checkpoint"])}; text: {_e(d["text"])}, {d["chars"]:,} characters'
        f'{_e(cut)}{dropped}. '
        f'charlm {_e(__version__)}, {d["seconds"]:.1f} s.</p>')

    # Surprise
    add("<h2>Surprise</h2>")
    add(f'<p><b>{d["bits_per_char"]:.4f} bits/char</b> ({d["loss"]:.4f} nats) over the '
        f'{d["chars"] - 1:,} predictions, in one pass from the first character. '
        f'<span class="note">charlm eval on these characters gives {d["eval_bits_per_char"]:.4f}: '
        'it splits a text into up to 64 streams that each start from a zero state, which costs '
        'more on a short text.</span></p>')
    add("<table><tr><th>class</th><th>characters</th><th>bits/char</th></tr>")
    for name in CLASSES:
        if name in d["by_class"]:
            c = d["by_class"][name]
            add(f'<tr><td>{name}</td><td class="n">{c["chars"]:,}</td>'
                f'<td class="n">{c["bits_per_char"]:.3f}</td></tr>')
    add("</table>")
    shown = len(page["text"])
    more = f" (the first {shown:,} of {d['chars']:,})" if shown < d["chars"] else ""
    add(f'<p class="note">Each character colored by its loss in bits{more}: white is '
        'predicted, deep red is 10 bits or more. Hover a character for the model\'s five most '
        'likely next characters before it.</p>')
    add('<div id="surprise" class="text"></div><div id="tip"></div>')
    add(f"<h3>The {len(d['surprising'])} most surprising places</h3>")
    add("<table><tr><th>at</th><th>bits</th><th>in context</th><th>the model expected</th></tr>")
    for s in d["surprising"]:
        expected = ", ".join(f"{_shown(repr(c))} {p:.2f}" for c, p in s["predicted"][:3])
        add(f'<tr><td class="n">{s["position"]:,}</td><td class="n">{s["bits"]:.1f}</td>'
            f'<td><code class="ctx">{_shown(s["before"][-30:])}<span class="mark">{_shown(s["char"])}'
            f'</span>{_shown(s["after"])}</code></td><td>{expected}</td></tr>')
    add("</table>")

    # Cells
    add("<h2>Cells</h2>")
    add(f'<p class="note"><b>Method.</b> {_e(d["method"])}</p>')
    add("<table><tr><th>feature</th><th>unit</th><th>r</th></tr>")
    for u in d["units"]:
        add(f'<tr class="pick" data-layer="{u["layer"]}" data-kind="{_e(u["kind"])}" '
            f'data-index="{u["index"]}"><td title="{_e(d["features"][u["feature"]])}">'
            f'{_e(u["feature"])}</td><td>layer {u["layer"]} {_e(u["kind"])}[{u["index"]}]</td>'
            f'<td class="n">{u["correlation"]:+.3f}</td></tr>')
    add("</table>")
    layers = "".join(f'<option value="{k}">{k}</option>' for k in range(L))
    kinds = "".join(f'<option value="{k}">{k}</option>' for k in page["kinds"])
    add(f'<form id="pick">layer <select id="layer">{layers}</select> state <select id="kind">'
        f'{kinds}</select> unit <input id="unit" type="number" min="0" max="{H - 1}" value="'
        f'{d["units"][0]["index"] if d["units"] else 0}"> <button type="submit">show</button> '
        '<span class="note">(or click a row above)</span></form>')
    if d["units"]:
        first = d["units"][0]
        data["first"] = [first["layer"], first["kind"], first["index"]]
    add('<p id="unit-info" class="note"></p>')
    add(f'<p class="note">The unit\'s value after each of the first {page["unit_chars"]:,} '
        'characters: red positive, blue negative (an LSTM\'s c as tanh(c)), as in Karpathy, '
        'Johnson and Fei-Fei, "Visualizing and Understanding Recurrent Networks" (2015).</p>')
    add('<div id="cells" class="text"></div>')

    # Gates
    add("<h2>Gates</h2>")
    if not d["gates"]:
        add("<p>A plain RNN has no gates: its state is tanh of a sum, nothing to draw here.</p>")
    else:
        add('<p class="note">Each dot is one unit of one gate: the fraction of the characters '
            'where the gate was below 0.1 (left-saturated, closed) against above 0.9 '
            '(right-saturated, open), as in Figure 3 of Karpathy et al.</p><div class="figs">')
        for k in range(L):
            rows = [g for g in d["gates"] if g["layer"] == k]
            pts = [(x, y, GATE_COLORS.get(g["gate"], "#555")) for g in rows
                   for x, y in zip(g["left"], g["right"], strict=True)]
            legend = [(g["gate"], GATE_COLORS.get(g["gate"], "#555")) for g in rows]
            add(f"<div><b>layer {k}</b><br>{_scatter(pts, f'gate saturation, layer {k}', legend)}</div>")
        add("</div><div class=\"figs\">")
        for dist in d["gate_distribution"]:
            title = f"{dist['gate']} gate values, layer {dist['layer']}"
            add(f"<div>{_histogram(dist['counts'], title)}</div>")
        add("</div>")

    # Memory
    add("<h2>Memory</h2>")
    mem = {p["k"]: p["loss"] for p in d["memory"]}
    gain = mem.get(64, float("nan")) - mem[None]
    add(f'<p>The loss at {d["memory_positions"]:,} positions (evenly spaced) when the state is '
        'reset to zeros k characters before each, against the same positions read with all the '
        f'text before them ("all", the normal evaluation). Context beyond 64 characters is worth '
        f'<b>{_num(gain, 4)} nats/char</b> here.</p>')
    add(_memory_figure(d["memory"]))
    heads = "".join(f"<th>{'all' if p['k'] is None else p['k']}</th>" for p in d["memory"])
    cells = "".join(f'<td class="n">{p["loss"]:.3f}</td>' for p in d["memory"])
    add(f"<table><tr><th>k</th>{heads}</tr><tr><td>nats</td>{cells}</tr></table>")
    add(f'<script id="data" type="application/json">{_json_block(data)}</script>')
    add(f"<script>{SCRIPT}</script></body></html>\n")
    return "".join(h)


def is_inspect_page(head: bytes) -> bool:
    """Whether the start of a file is a page this command wrote (which it may replace)."""
    return f'<meta name="generator" content="{GENERATOR} '.encode() in head[:4096]


def check_output(path: Path, force: bool) -> None:
    """Refuse to replace a file that is not a page of this command (without ``force``) or a
    directory, before any work is done."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; name a .html file")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {path}: the folder {path.parent} does not exist")
    if path.exists() and not force:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError as exc:
            raise CharlmError(f"cannot read {path}: {exc.strerror}") from None
        if not is_inspect_page(head):
            raise CharlmError(f"{path} already exists and is not a charlm inspect page; pass "
                              "--force to replace it, or -o another name")


def write_page(path: Path, document: dict, page: dict, force: bool) -> int:
    """Write the page (atomically); returns its size in bytes."""
    check_output(path, force)
    data = render(document, page).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
    return len(data)
