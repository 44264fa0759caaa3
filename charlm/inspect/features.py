"""Simple features of a text, one value per character, and the units whose activation
tracks them best.

The method, stated on the page too: for every unit (each layer's ``h``, and an LSTM's ``c``)
and every feature, the Pearson correlation between the unit's value after each character and
the feature's value at that character, over all the characters inspected. Each feature's best
unit is the one with the largest absolute correlation. A correlation says that the two move
together on this text, not that the unit computes the feature.
"""

from __future__ import annotations

import unicodedata

import numpy as np

# name -> what it is, for the page and --json; all are 0/1 but the depth and the position.
FEATURES: dict[str, str] = {
    "in_quotes": "inside double quotes (the opening quote through the closing one)",
    "in_brackets": "inside (), [] or {} (the opening bracket through the closing one)",
    "bracket_depth": "nesting depth of (), [] and {}",
    "line_position": "position in the line (0 for its first character)",
    "word_start": "a letter after a non-letter",
    "after_newline": "the first character of a line",
    "upper_case": "an upper-case letter",
    "digit": "a digit",
}
OPEN, CLOSE = "([{", ")]}"


def text_features(text: str) -> np.ndarray:
    """(T, F) float64, the columns in :data:`FEATURES` order, one row per character."""
    out = np.zeros((len(text), len(FEATURES)))
    quote = False
    depth = pos = 0
    prev_letter, prev = False, ""
    for t, ch in enumerate(text):
        if ch == '"':
            quote = not quote
        in_quote = quote or ch == '"'  # the closing quote still belongs to the quotation
        if ch in OPEN:
            depth += 1
        row_depth = depth
        if ch in CLOSE:
            depth = max(depth - 1, 0)
        letter = ch.isalpha()
        out[t] = (in_quote, row_depth > 0, row_depth, pos, letter and not prev_letter,
                  prev == "\n" or t == 0, ch.isupper(), ch.isdigit())
        pos = 0 if ch == "\n" else pos + 1
        prev_letter, prev = letter, ch
    return out


CLASSES = ("letters", "digits", "spaces", "newlines", "punctuation", "other")


def char_class(ch: str) -> str:
    if ch == "\n":
        return "newlines"
    if ch.isspace():
        return "spaces"
    if ch.isalpha():
        return "letters"
    if ch.isdigit():
        return "digits"
    if unicodedata.category(ch).startswith("P"):
        return "punctuation"
    return "other"


class Correlator:
    """Pearson correlations between units (T, H) and features (T, F), accumulated chunk by
    chunk in float64 so that long texts need no more memory than a chunk."""

    def __init__(self, units: int, features: int):
        self.n = 0
        self.sx, self.sxx = np.zeros(units), np.zeros(units)
        self.sf, self.sff = np.zeros(features), np.zeros(features)
        self.sfx = np.zeros((features, units))

    def add(self, acts: np.ndarray, feats: np.ndarray) -> None:
        acts, feats = np.asarray(acts, np.float64), np.asarray(feats, np.float64)
        self.n += len(acts)
        self.sx += acts.sum(0)
        self.sxx += (acts * acts).sum(0)
        self.sf += feats.sum(0)
        self.sff += (feats * feats).sum(0)
        self.sfx += feats.T @ acts

    def correlations(self) -> np.ndarray:
        """(F, H); NaN where a feature or a unit is constant over the text."""
        n = self.n
        cov = n * self.sfx - np.outer(self.sf, self.sx)
        var_f = n * self.sff - self.sf ** 2
        var_x = n * self.sxx - self.sx ** 2
        # Constant within rounding counts as constant: no correlation to speak of.
        var_f = np.where(var_f > 1e-9 * max(n, 1) ** 2, var_f, np.nan)
        var_x = np.where(var_x > 1e-12 * max(n, 1) ** 2, var_x, np.nan)
        with np.errstate(invalid="ignore"):
            return np.clip(cov / np.sqrt(np.outer(var_f, var_x)), -1.0, 1.0)


def best_units(r: np.ndarray) -> list[tuple[str, int, float]]:
    """For each feature (a row of ``r``, (F, H)) that varies: (feature, best unit index, its
    correlation), the best being the largest |r|."""
    found = []
    for name, row in zip(FEATURES, r, strict=True):
        if np.all(np.isnan(row)):
            continue
        k = int(np.nanargmax(np.abs(row)))
        found.append((name, k, float(row[k])))
    return found
