"""Key-value retrieval from "Lost in the Middle" (LitM; Liu et al. 2023, §3): a JSON object of random UUID
key-value pairs (75, 140 or 300 pairs), "extract the value of key K"; the gold pair is moved to a chosen
position, everything else keeps its order. The paper we reproduce does not report it; kvlib evaluates it as
the real-data sibling of the synthetic task (issue: key-value retrieval evaluations).

Record format (LitM kv_retrieval_data/kv-retrieval-{N}_keys.jsonl.gz): {"ordered_kv_records": [[key, value],
...], "key": ..., "value": ...}. Prompt: LitM's kv_retrieval.prompt, kept verbatim in
kvlib/tasks/templates/litm_kv_retrieval.prompt.txt. Metric: LitM's, the value appears in the answer (case-insensitive).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from kvlib.engine.data import JsonlReport, read_jsonl_records, resolve_data_dir
from kvlib.engine.evaluate import answer_requests, result_fields
from kvlib.tasks import litm_kv
from kvlib.tasks.synthetic import load_template

_FILE = re.compile(r"kv-retrieval-(\d+)_keys")


class KVRetrievalFormatError(ValueError):
    """A LitM key-value retrieval file that does not have the expected shape (message names file:line)."""


@dataclass(frozen=True)
class KVRetrievalExample:
    pairs: tuple[tuple[str, str], ...]  # in file order
    key: str
    value: str

    def __post_init__(self) -> None:
        keys = [k for k, _ in self.pairs]
        if len(keys) < 2:
            raise ValueError(f"need at least 2 key-value pairs, got {len(keys)}")
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys")
        if (self.key, self.value) not in self.pairs:
            raise ValueError(f"the pair ({self.key!r}, {self.value!r}) is not among the records")

    @property
    def gold_index(self) -> int:
        return self.pairs.index((self.key, self.value))


def _example(record: object) -> KVRetrievalExample:
    if not isinstance(record, dict) or not {"ordered_kv_records", "key", "value"} <= set(record):
        raise ValueError("expected an object with ordered_kv_records, key and value")
    pairs = record["ordered_kv_records"]
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and x for x in p) for p in pairs):
        raise ValueError("ordered_kv_records must be a list of [key, value] string pairs")
    if not isinstance(record["key"], str) or not isinstance(record["value"], str):
        raise ValueError("key and value must be strings")
    return KVRetrievalExample(tuple((k, v) for k, v in pairs), record["key"], record["value"])


def kv_retrieval_path(num_keys: int, data_dir: str | Path | None = None) -> Path:
    """<data>/mdqa/kv_retrieval_data/kv-retrieval-<num_keys>_keys.jsonl.gz (LitM's layout)."""
    path = resolve_data_dir(data_dir) / "mdqa" / "kv_retrieval_data" / f"kv-retrieval-{num_keys}_keys.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}; official source: https://github.com/nelson-liu/lost-in-the-middle "
                                f"(kv_retrieval_data/)")
    return path


def load_kv_retrieval(path: str | Path) -> tuple[list[KVRetrievalExample], JsonlReport]:
    """Every example of a LitM KV retrieval file, validated; an error names file:line. A file named
    kv-retrieval-N_keys must hold N pairs per record."""
    rows, report = read_jsonl_records(path)
    match = _FILE.search(Path(path).name)
    examples = []
    for lineno, record in rows:
        try:
            example = _example(record)
            if match and len(example.pairs) != int(match.group(1)):
                raise ValueError(f"the file name promises {match.group(1)} pairs, the record has {len(example.pairs)}")
        except ValueError as exc:
            raise KVRetrievalFormatError(f"{path}:{lineno}: {exc}") from None
        examples.append(example)
    if not examples:
        raise KVRetrievalFormatError(f"{path}: no records")
    return examples, report


def with_gold_at(example: KVRetrievalExample, position: int, num_pairs: int | None = None) -> list[tuple[str, str]]:
    """The pairs with the gold pair moved to 1-based `position`, the others in their order (LitM's protocol).
    `num_pairs` keeps the gold and the first num_pairs-1 others (a shorter context from the same data, like
    LitM's K-document variants); None keeps all."""
    total = len(example.pairs) if num_pairs is None else num_pairs
    if isinstance(total, bool) or not isinstance(total, int) or not 2 <= total <= len(example.pairs):
        raise ValueError(f"num_pairs must be an integer in [2, {len(example.pairs)}], got {num_pairs!r}")
    if isinstance(position, bool) or not isinstance(position, int) or not 1 <= position <= total:
        raise ValueError(f"position must be an integer in [1, {total}], got {position!r}")
    pairs = [p for p in example.pairs if p != (example.key, example.value)][:total - 1]
    pairs.insert(position - 1, (example.key, example.value))
    return pairs


def format_kv_prompt(pairs: Sequence[tuple[str, str]], key: str) -> str:
    """LitM's prompt: the pairs as a JSON object, one pair per line, then the key."""
    if len(pairs) < 2 or key not in {k for k, _ in pairs}:
        raise ValueError("need at least 2 pairs, one of them with `key`")
    lines = [f'"{k}": "{v}"' for k, v in pairs]
    formatted = "{" + ",\n ".join(lines) + "}"
    return load_template("litm_kv_retrieval.prompt").rstrip("\n").format(formatted_kv_records=formatted, key=key)


def score_kv_retrieval(response: str, value: str) -> float:
    """LitM's metric: 1.0 if the value occurs in the response, case-insensitively."""
    if not isinstance(response, str) or not isinstance(value, str) or not value:
        raise TypeError("response and value must be strings (value non-empty)")
    return 1.0 if value.lower() in response.lower() else 0.0


def sample_examples(examples: Sequence[KVRetrievalExample], n: int | None, seed: int) -> list[KVRetrievalExample]:
    """`n` examples drawn with `seed` (all when None), in file order."""
    examples = list(examples)
    if n is None or n >= len(examples):
        return examples
    return [examples[i] for i in sorted(random.Random(f"kvlib/litm-kv/{seed}").sample(range(len(examples)), n))]


def evaluate_litm_kv(backend: Any, examples: Sequence[Any], positions: Sequence[int], num_pairs: int | None,
                     max_new_tokens: int, label: str) -> list[dict]:
    """LitM key-value retrieval (kvlib.tasks.litm_kv): each example with its gold pair at each 1-based position,
    LitM's prompt as the user turn, LitM's metric. Over-length prompts: `over_length=True`, `correct=None`."""

    keys, requests = [], []
    for index, example in enumerate(examples):
        for position in positions:
            pairs = litm_kv.with_gold_at(example, position, num_pairs)
            keys.append((index, example, position, len(pairs)))
            requests.append([{"role": "user", "content": litm_kv.format_kv_prompt(pairs, example.key)}])
    answers = answer_requests(backend, requests, max_new_tokens)
    fields = result_fields(backend, max_new_tokens)
    return [{"model": label, "example": index, "num_pairs": n, "position": position, "key": example.key,
             "value": example.value, "response": answer, "over_length": answer is None,
             "correct": None if answer is None else litm_kv.score_kv_retrieval(answer, example.value), **fields}
            for (index, example, position, n), answer in zip(keys, answers)]
