"""Scoring of free-text answers. One home for every metric kvlib reports (their intervals and tests:
kvlib.stats).

Synthetic key-value tasks: parse the value, the dictionary name and (multi-subkey) the full key from
what a model wrote, with or without the answer template, and compare with the sample's metadata.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

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
    """Per-sample scores against a sample's metadata (as written by kvlib.tasks.synthetic):
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


def _check_prediction(prediction: str, answers, name: str) -> None:
    """A reply (str) and a non-empty list of gold answers (str), as every short-answer metric takes them."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or not answers:
        raise ValueError(f"{name} must be a non-empty list of str, got {answers!r}")
    if not all(isinstance(a, str) for a in answers):
        raise TypeError(f"{name} must all be str, got {answers!r}")


def best_subspan_em(prediction: str, ground_truths) -> float:
    """1.0 if any normalised gold answer occurs as a substring of the normalised prediction, else 0.0
    (LitM's metric). As in LitM, a gold answer that normalises to "" (e.g. "*") matches every
    prediction; in the LitM oracle file that happens once ("what is the multiplication sign on the
    computer"). LitM scores only the first line of the model output: that cut is the caller's job."""
    _check_prediction(prediction, ground_truths, "ground_truths")
    normalized_prediction = normalize_answer(prediction)
    return 1.0 if any(normalize_answer(g) in normalized_prediction for g in ground_truths) else 0.0


def score_mdqa_answer(response: str, answers) -> float:
    """LitM's MDQA score of a model response: best_subspan_em on its first line only (LitM's evaluation
    script keeps `response.split("\n")[0].strip()`, so an answer mentioned later does not count)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    return best_subspan_em(response.strip().split("\n")[0].strip(), answers)


# ---------------------------------------------------------------- general benchmarks (kvlib.tasks.general)
# Conventions of lm-evaluation-harness (lm_eval/tasks/gsm8k/gsm8k-cot.yaml, lm_eval/api/task.py,
# lm_eval/api/metrics.py), re-implemented; kvlib.tasks.general declares which task uses which.

# gsm8k-cot "strict-match": the first "The answer is <number>". The harness's pattern ends in an unescaped
# ".", i.e. one more character of any kind; kept as is, so a reply that ends "The answer is 18" with nothing
# after it yields "1" there too (flexible-extract still finds 18).
_GSM8K_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
# "flexible-extract": the last number-like run (two or more of digits, "$", ".", ",", or a bare integer)
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_INVALID = "[invalid]"  # what the harness's regex filter returns when nothing matches
# removed from prediction and reference, in this order, before comparing (the task's regexes_to_ignore)
_GSM8K_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def extract_gsm8k_strict(text: str) -> str:
    """The number after the first "The answer is" (harness gsm8k-cot strict-match), else "[invalid]"."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    match = _GSM8K_STRICT.search(text)
    return match.group(1).strip() if match else GSM8K_INVALID


def extract_gsm8k_flexible(text: str) -> str:
    """The last number-like run of the reply (harness flexible-extract), else "[invalid]"."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    matches = _GSM8K_FLEXIBLE.findall(text)
    if not matches:
        return GSM8K_INVALID
    return next(group for group in matches[-1] if group).strip()


def normalize_gsm8k_number(text: str) -> str:
    """What the harness compares: commas, "$", anything up to "#### " and one trailing "." removed,
    lower-cased. Numbers are compared as text: "5.00" does not equal "5" (as in the harness)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def gsm8k_exact_match(extracted: str, reference: str) -> float:
    """1.0 when an extracted answer equals the reference final number after normalize_gsm8k_number."""
    return 1.0 if normalize_gsm8k_number(extracted) == normalize_gsm8k_number(reference) else 0.0


def exact_match_any(prediction: str, answers) -> float:
    """SQuAD exact match against every alias: 1.0 when normalize_answer(prediction) equals any normalised
    answer. An empty prediction (after normalisation) never matches, not even an alias that normalises to
    "" (e.g. "*"): saying nothing is not an answer."""
    _check_prediction(prediction, answers, "answers")
    normalized = normalize_answer(prediction)
    return 1.0 if normalized and any(normalize_answer(a) == normalized for a in answers) else 0.0


_LETTER_ALONE = re.compile(r"^\W*([A-Z])\W*$")  # "B", "(B)", "B."
_LETTER_FIRST = re.compile(r"^\W*([A-Z])[.):]")  # "B. 42", "(B) 42", "B: 42" (not "A good ...")
_LETTER_PHRASE = re.compile(r"(?i:\b(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*(?:option\s+)?)[(\[]?([A-Z])\b")


def parse_choice_letter(text: str, n_choices: int = 4) -> str | None:
    """The option letter a chat model chose (generative multiple choice), or None when the reply does not
    say one clearly. Accepted, in order: a reply that is just the letter ("B", "(B)"); a reply starting with
    the letter and ".", ")" or ":" ("B. 42"); "answer/option/choice [is] [:] X" anywhere ("The answer is
    (C)"). Only capital letters among the first `n_choices` count, so the article "A" in "A good guess is
    C" is not read as a choice."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(n_choices, bool) or not isinstance(n_choices, int) or not 2 <= n_choices <= 26:
        raise ValueError(f"n_choices must be an integer in [2, 26], got {n_choices!r}")
    allowed = {chr(ord("A") + i) for i in range(n_choices)}
    for pattern in (_LETTER_ALONE, _LETTER_FIRST):
        match = pattern.match(text.strip())
        if match and match.group(1) in allowed:
            return match.group(1)
    for match in _LETTER_PHRASE.finditer(text):
        if match.group(1) in allowed:
            return match.group(1)
    return None


def multiple_choice_scores(logliks, choices, gold: int) -> dict:
    """lm-evaluation-harness multiple-choice metrics of one item from the log-likelihood of each choice:
    `acc` (argmax of the log-likelihoods) and `acc_norm` (argmax of log-likelihood / number of characters
    of the choice text, without the " " that joins it to the context). Ties go to the first choice."""

    lls = np.asarray(list(logliks), dtype=float)
    if lls.ndim != 1 or lls.size < 2 or len(choices) != lls.size:
        raise ValueError(f"need one log-likelihood per choice (>= 2), got {lls.size} for {len(choices)} choices")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"choices must be non-empty strings, got {choices!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < lls.size:
        raise ValueError(f"gold must be a choice index in [0, {lls.size}), got {gold!r}")
    lengths = np.array([float(len(c)) for c in choices])
    pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


# ---------------------------------------------------------------- true/false verdicts (FLenQA)
# The FLenQA authors take whichever of "true"/"false" occurs last (after "not true" -> "false"). Kept on
# whole words, with two refinements for chain-of-thought replies; see parse_true_false.

# Option lists that the prompts themselves contain ("True/False Question", "answer with 'true' or
# 'false'"): echoed back, they are no verdict.
_TF_OPTIONS = re.compile(r"\b(?:true\W{0,3}\s*(?:/|\bor\b)\s*\W{0,3}false|false\W{0,3}\s*(?:/|\bor\b)\s*\W{0,3}true)\b",
                         re.IGNORECASE)
_TF_WORD = re.compile(r"\b(true|false|untrue)\b", re.IGNORECASE)
_TF_NEGATED = re.compile(r"(?:\bnot|n't|\bnever)\s+\W{0,3}$", re.IGNORECASE)  # right before the verdict
_TF_AFTER_ANSWER = re.compile(r"\banswer\s*(?:is\s*)?[:=\-]?\s*\W{0,3}\s*(?:not\s+\W{0,3})?$", re.IGNORECASE)
_TF_LEADING = re.compile(r"[\W_]*(?:(?:final\s+)?answer\s*(?:is\s*)?[:=\-]?)?[\W_]*(?:not\s+\W{0,3})?", re.IGNORECASE)


def parse_true_false(text: str) -> bool | None:
    """The true/false verdict of a reply, or None when it gives none (FLenQA's "unparseable").

    Verdict words are whole words "true"/"false"/"untrue"; one right after "not"/"n't"/"never" flips
    ("not true" -> False). Option lists such as "True/False" or "'true' or 'false'" are ignored. Which
    verdict counts, in order: the last one that follows "answer [is] [:]" (a chain of thought's "so the
    answer is False"); else the first, if the reply opens with it ("False. The statement ... is true
    only if ..."); else the last one (the authors' rule). "Yes"/"no" are not verdicts, as in the
    authors' scoring."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = _TF_OPTIONS.sub(" ", text)
    verdicts = []  # (value, follows "answer", start)
    for match in _TF_WORD.finditer(text):
        before = text[:match.start()]
        value = match.group(1).lower() == "true"
        if _TF_NEGATED.search(before):
            value = not value
        verdicts.append((value, bool(_TF_AFTER_ANSWER.search(before)), match.start()))
    if not verdicts:
        return None
    answered = [v for v in verdicts if v[1]]
    if answered:
        return answered[-1][0]
    first = verdicts[0]
    if _TF_LEADING.fullmatch(text[:first[2]]):
        return first[0]
    return verdicts[-1][0]
