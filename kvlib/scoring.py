"""Scoring of free-text answers. One home for every metric kvlib reports.

Synthetic key-value tasks: parse the value, the dictionary name and (multi-subkey) the full key from
what a model wrote, with or without the answer template, and compare with the sample's metadata.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_INT = re.compile(r"(?<![\d.])-?\d+(?!\.?\d)")  # whole integers, not digits of decimals
_DICT_NAME = re.compile(r"dictionary\s*\[?\s*(\d+)\s*\]?", re.IGNORECASE)
_TUPLE = re.compile(r"\(\s*(-?\d+(?:\s*,\s*-?\d+)+)\s*,?\s*\)")
# "... is 8364 and ..." / "value: 8364" / "value is 8364" : the number right after the verb
_VALUE_PHRASE = re.compile(
    r"\bvalue\b(?:\s+of\s+(?:the\s+)?key\s+\(?[\d,\s]+\)?)?\s*(?:is|:|=)\s*\[?(-?\d+)(?!\.?\d)", re.IGNORECASE
)


@dataclass(frozen=True)
class ParsedKVAnswer:
    value: int | None
    dictionary: str | None
    key: tuple[int, ...] | None


def parse_kv_answer(text: str, query_key: int | None = None, query_subkeys: list[int] | None = None) -> ParsedKVAnswer:
    """Extract (value, dictionary name, full key) from free text.

    The value is the number after "value ... is"; failing that, the first integer that is neither the
    queried key, one of the queried subkeys, a dictionary name, nor inside a key tuple.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    dict_match = _DICT_NAME.search(text)
    dictionary = dict_match.group(1) if dict_match else None

    tuples = [tuple(int(x) for x in m.group(1).split(",")) for m in _TUPLE.finditer(text)]
    key = tuples[0] if tuples else None
    if query_subkeys and tuples:
        # the first tuple that holds every queried subkey is the model's key; else its first tuple
        key = next((t for t in tuples if set(query_subkeys) <= set(t)), tuples[0])

    # spans we must not read a value from: dictionary names and key tuples
    blocked = [m.span() for m in _DICT_NAME.finditer(text)] + [m.span() for m in _TUPLE.finditer(text)]
    excluded = set(query_subkeys or []) | ({query_key} if query_key is not None else set())

    def allowed(m: re.Match) -> bool:
        inside = any(a <= m.start() < b for a, b in blocked)
        return not inside and int(m.group(0)) not in excluded

    value = None
    for m in _VALUE_PHRASE.finditer(text):
        candidate = int(m.group(1))
        if candidate not in excluded:
            value = candidate
            break
    if value is None:
        first = next((m for m in _INT.finditer(text) if allowed(m)), None)
        value = int(first.group(0)) if first else None
    return ParsedKVAnswer(value=value, dictionary=dictionary, key=key)


def score_kv_answer(text: str, meta: dict) -> dict:
    """Per-sample scores against a sample's metadata (as written by kvlib.generate):
    `value` (value right), `dictionary` (dictionary right), `key` (multi-subkey: full key right,
    simple: always True) and `exact` (all of them)."""
    for field in ("task", "value", "gold_dict_name", "key"):
        if field not in meta:
            raise KeyError(f"sample metadata lacks {field!r}")
    multi = meta["task"] == "multisubkey"
    parsed = parse_kv_answer(
        text,
        query_key=None if multi else meta["key"],
        query_subkeys=meta.get("query_subkeys") if multi else None,
    )
    value_ok = parsed.value == meta["value"]
    dict_ok = parsed.dictionary == str(meta["gold_dict_name"])
    key_ok = (parsed.key == tuple(meta["key"])) if multi else True
    return {
        "parsed_value": parsed.value,
        "parsed_dictionary": parsed.dictionary,
        "value": value_ok,
        "dictionary": dict_ok,
        "key": key_ok,
        "exact": value_ok and dict_ok and key_ok,
    }


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-item scores (0/1 or real) with a percentile bootstrap CI over items, seeded so
    reports are reproducible. Returns (mean, low, high)."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


# ---------------------------------------------------------------- open-domain QA (MDQA, NQ-Open)

import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)  # ASCII only, as in the SQuAD script: "×", "—" survive


def normalize_answer(s: str) -> str:
    """SQuAD answer normalisation (the one "Lost in the Middle" scores with): lower-case, drop ASCII
    punctuation, drop the articles a/an/the, collapse whitespace. Order matters: punctuation goes
    before articles, so "the-end" -> "theend" keeps its "the"."""
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer needs a str, got {type(s).__name__}")
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def best_subspan_em(prediction: str, ground_truths) -> float:
    """1.0 if any normalised gold answer occurs as a substring of the normalised prediction, else 0.0
    (LitM's metric). As in LitM, a gold answer that normalises to "" (e.g. "*") matches every
    prediction; in the LitM oracle file that happens once ("what is the multiplication sign on the
    computer"). LitM scores only the first line of the model output: that cut is the caller's job."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(ground_truths, str) or not isinstance(ground_truths, (list, tuple)) or not ground_truths:
        raise ValueError(f"ground_truths must be a non-empty list of str, got {ground_truths!r}")
    if not all(isinstance(g, str) for g in ground_truths):
        raise TypeError(f"ground_truths must all be str, got {ground_truths!r}")
    normalized_prediction = normalize_answer(prediction)
    return 1.0 if any(normalize_answer(g) in normalized_prediction for g in ground_truths) else 0.0
