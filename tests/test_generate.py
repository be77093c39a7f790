"""Synthetic key-value generator: invariants, determinism, positions, params validation, CLI."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kvlib.tasks import synthetic as gen
from kvlib.pipeline.cli import main as cli_main
from kvlib.engine.config import ParamError, from_mapping
from kvlib.engine.data import read_jsonl
from kvlib.tasks.synthetic import GenerationConfig
from kvlib.pipeline import notebooks


def char_counter(texts):
    """A cheap stand-in tokenizer (~3 chars per token) for invariant tests that need no real model."""
    return [len(t) // 3 for t in texts]


SMALL_SIMPLE = GenerationConfig(num_dicts=12, n_train=60, n_eval=30, max_tokens=2000, tokenizer="chars")
SMALL_MULTI = dataclasses.replace(SMALL_SIMPLE, task="multisubkey")


# ------------------------------------------------------------------ an independent solver of the prompt

LINE = re.compile(r"^Dictionary \[(\d+)\] (\{.*\})$", re.MULTILINE)


def solve(prompt: str, task: str):
    """Answer a prompt from its text alone: (value, dictionary name, key). Asserts it is unambiguous."""
    dicts = [(name, ast.literal_eval(body)) for name, body in LINE.findall(prompt)]
    if task == "simple":
        key = int(re.search(r"Report the value of key (\d+) and", prompt).group(1))
        hits = [(d[key], name, key) for name, d in dicts if key in d]
    else:
        subkeys = {int(x) for x in re.search(r"contains the integers ([\d, ]+) \(not", prompt).group(1).split(", ")}
        hits = [(v, name, k) for name, d in dicts for k, v in d.items() if subkeys <= set(k)]
    assert len(hits) == 1, f"ambiguous or missing answer: {hits}"
    return hits[0]


def all_integers(prompt: str) -> Counter:
    body = "\n".join(m.group(0) for m in LINE.finditer(prompt))
    body = re.sub(r"Dictionary \[\d+\]", "", body)  # names are not keys or values
    return Counter(int(x) for x in re.findall(r"\d+", body))


@pytest.mark.parametrize("cfg", [SMALL_SIMPLE, SMALL_MULTI], ids=["simple", "multisubkey"])
def test_answer_derivable_and_gold_unique(cfg):
    data = gen.generate(cfg, char_counter)
    assert [len(data["train"]), len(data["eval"])] == [cfg.n_train, cfg.n_eval]
    for s in data["train"] + data["eval"]:
        value, name, key = solve(s.prompt, cfg.task)
        m = s.meta
        assert (value, name) == (m["value"], m["gold_dict_name"])
        assert str(m["gold_position"]) == m["gold_dict_name"]
        ints = all_integers(s.prompt)
        assert ints[m["value"]] == 1, "gold value must occur exactly once"
        if cfg.task == "simple":
            assert key == m["key"] and ints[m["key"]] == 1, "gold key must occur exactly once"
            expected = f"The value of key {key} is {value} and it is in Dictionary [{name}]."
        else:
            assert list(key) == m["key"] and sorted(m["query_subkeys"]) == sorted(key)
            assert s.prompt.count(repr(tuple(key))) == 1, "gold key must occur exactly once"
            expected = (f"The key that contains the integers {', '.join(map(str, m['query_subkeys']))} is "
                        f"{tuple(key)!r}, its value is {value}, and it is in Dictionary [{name}].")
        assert s.answer == expected
        assert s.prompt.count("Answer in the following template:") == (1 if cfg.template else 0)


def test_dictionary_format_and_sizes():
    s = gen.generate(SMALL_SIMPLE, char_counter)["train"][0]
    names = [int(n) for n, _ in LINE.findall(s.prompt)]
    assert names == list(range(1, SMALL_SIMPLE.num_dicts + 1))
    for name, body in LINE.findall(s.prompt):
        d = ast.literal_eval(body)
        assert body == repr(d), "dictionary lines are Python dict reprs"
        lo, hi = SMALL_SIMPLE.dict_size_range
        size = len(d)
        assert size == SMALL_SIMPLE.gold_dict_size if int(name) == s.meta["gold_position"] else lo <= size <= hi
        for k, v in d.items():
            assert 3 <= len(str(k)) <= 4 and 3 <= len(str(v)) <= 4


def test_prompt_matches_official_text():
    s = gen.generate(dataclasses.replace(SMALL_SIMPLE, template=False), char_counter)["train"][0]
    assert s.prompt.startswith("Do a task using the list of dictionaries below.\n\nDictionary [1] {")
    assert s.prompt.endswith(
        f"\n\nAbove is a list of dictionaries such that each key and value is an integer. "
        f"Report the value of key {s.meta['key']} and the dictionary it is in."
    )
    t = gen.generate(SMALL_SIMPLE, char_counter)["train"][0]
    assert t.prompt == s.prompt + (
        f" Answer in the following template:\nThe value of key {s.meta['key']} is <fill-in-value> "
        f"and it is in Dictionary [<fill-in-dictionary-name>]."
    ), "same seed: the template variant is the same data with the template appended"
    assert t.answer == s.answer


def test_openai_and_hf_formats():
    cfg = dataclasses.replace(SMALL_SIMPLE, n_train=3, n_eval=2)
    data = gen.generate(cfg, char_counter)
    s = data["train"][0]
    assert [m["role"] for m in s.messages()] == ["user", "assistant"]
    sys_msg = s.messages("Write a response that appropriately completes the request.")
    assert [m["role"] for m in sys_msg] == ["system", "user", "assistant"]


def test_positions_fractions():
    cfg = dataclasses.replace(SMALL_SIMPLE, num_dicts=85, n_train=400, n_eval=0)
    positions = gen.gold_positions(cfg, 400, __import__("random").Random(1))
    # 5% forced to the first dictionary, 3% more within the first 5% (= 5 of 85) dictionaries
    assert positions.count(0) >= 20
    assert sum(p < 5 for p in positions) >= 20 + 12
    assert max(positions) == 84 and min(positions) == 0
    nofrac = gen.gold_positions(dataclasses.replace(cfg, frac_first=0, frac_first_5pct=0), 400,
                                __import__("random").Random(1))
    assert nofrac.count(0) < 20


def test_token_budget_respected_and_resampled():
    def counter(texts):  # pretend prompts are long: only short dictionaries fit
        return [len(t) // 2 for t in texts]
    base = dataclasses.replace(SMALL_SIMPLE, n_train=40, n_eval=0, dict_size_range=(1, 6))
    budget = int(sorted(counter([s.prompt for s in gen.generate(base, counter)["train"]]))[20]) + base.reserve_tokens
    cfg = dataclasses.replace(base, max_tokens=budget)
    samples = gen.generate(cfg, counter)["train"]
    assert all(s.meta["n_tokens"] <= budget - cfg.reserve_tokens for s in samples)
    assert all(counter([s.prompt])[0] == s.meta["n_tokens"] for s in samples)
    assert any(s.meta["draws"] > 1 for s in samples), "some samples must have been redrawn"


def test_eval_never_repeats_train():
    # tiny space of prompts: collisions would be likely without the exclusion
    cfg = GenerationConfig(num_dicts=1, gold_dict_size=1, dict_size_range=(1, 1), key_digits=(1, 1),
                           value_digits=(1, 1), n_train=20, n_eval=10, max_tokens=500, tokenizer="chars")
    data = gen.generate(cfg, char_counter)
    assert not {s.prompt for s in data["train"]} & {s.prompt for s in data["eval"]}


def test_batching_does_not_change_output():
    a = gen.generate_split(SMALL_MULTI, "train", 20, char_counter, batch_size=1)
    b = gen.generate_split(SMALL_MULTI, "train", 20, char_counter, batch_size=64)
    assert [(s.prompt, s.answer, s.meta) for s in a] == [(s.prompt, s.answer, s.meta) for s in b]


# ------------------------------------------------------------------ params validation

@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_dictz": 3}, "num_dictz"),
        ({"n_train": -1}, "n_train"),
        ({"num_dicts": 0}, "num_dicts"),
        ({"key_digits": [1, 1], "dict_size_range": [8, 9]}, "key_digits"),
        ({"dict_size_range": [4, 3]}, "dict_size_range"),
        ({"frac_first": 1.5}, "frac_first"),
        ({"task": "triple"}, "task"),
        ({"num_dicts": "many"}, "num_dicts"),
        ({"template": "yes"}, "template"),
        ({"task": "multisubkey", "common_subkeys": 3, "gold_subkeys": 3}, "common_subkeys"),
        ({"max_tokens": 50}, "max_tokens"),
    ],
)
def test_bad_params_name_the_field(overrides, field):
    with pytest.raises(ParamError, match=rf"^{field}:"):
        from_mapping(GenerationConfig, overrides)


def test_max_tokens_too_small_fails_before_generating():
    cfg = dataclasses.replace(SMALL_SIMPLE, max_tokens=300, reserve_tokens=100)
    calls = []

    def counter(texts):
        calls.append(len(texts))
        return char_counter(texts)

    with pytest.raises(ParamError, match=r"^max_tokens: 300 is too small"):
        gen.generate(cfg, counter)
    assert calls == [1], "only the one feasibility probe may run"


def test_notebook_params_nested_errors():
    with pytest.raises(ParamError, match=r"^datasets\.a\.num_dicts: must be >= 1"):
        from_mapping(notebooks.SyntheticDataNotebookParams, {"datasets": {"a": {"num_dicts": 0}}})
    with pytest.raises(ParamError, match=r"^datasets: at least one"):
        from_mapping(notebooks.SyntheticDataNotebookParams, {})


# ------------------------------------------------------------------ files and CLI (real embedded tokenizer)

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_cli_paper_config_deterministic(tmp_path, capsys):
    """The paper config (85 dicts, <= 4096 tokens) from the shipped params, twice with the same seed:
    byte-identical files; another seed: different files."""
    params = Path(__file__).resolve().parents[1] / "params" / "paper-mistral" / "generate_simple_template.yaml"
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        out = tmp_path / name
        rc = cli_main(["generate", "--params", str(params), "--seed", str(seed), "--out", str(out), "--quiet"])
        assert rc == 0
        runs[name] = {p.name: _sha(p) for p in sorted(out.iterdir())}
    assert runs["a"] == runs["b"]
    assert runs["a"]["train.jsonl"] != runs["c"]["train.jsonl"]
    metas = read_jsonl(tmp_path / "a" / "train.meta.jsonl")
    evals = read_jsonl(tmp_path / "a" / "eval.meta.jsonl")
    assert (len(metas), len(evals)) == (350, 150)
    assert all(m["n_tokens"] <= 4096 - 100 for m in metas + evals)
    assert all(m["num_dicts"] == 85 and m["tokenizer"] == "mistral-7b-v0.1" for m in metas)
    openai_rows = read_jsonl(tmp_path / "a" / "train.openai.jsonl")
    assert openai_rows[0]["messages"][0] == {
        "role": "system", "content": "Write a response that appropriately completes the request."}
    assert "prompt tokens" in capsys.readouterr().out
    back = gen.load_dataset(tmp_path / "a", "eval")
    assert back[0].meta == evals[0] and back[0].answer.startswith("The value of key")


def test_cli_bad_param_exit_code(tmp_path, capsys):
    rc = cli_main(["generate", "--n-train", "-5", "--out", str(tmp_path / "x"), "--tokenizer", "chars"])
    assert rc == 2
    assert "n_train: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_params_file_unknown_key(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text("generation:\n  num_dicts: 5\n  gold_dict_sise: 2\n")
    rc = cli_main(["generate", "--params", str(p), "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gold_dict_sise: unknown parameter (did you mean 'gold_dict_size'?)" in err


def test_written_files_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "generate", lambda cfg, progress=False: {
        "train": gen.generate_split(cfg, "train", cfg.n_train, char_counter),
        "eval": gen.generate_split(cfg, "eval", cfg.n_eval, char_counter)})
    cfg = dataclasses.replace(SMALL_MULTI, n_train=5, n_eval=3)
    gen.write_dataset(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{s}{suffix}" for s in ("train", "eval") for suffix in (".jsonl", ".openai.jsonl", ".meta.jsonl")]
        + ["config.json", "stats.json"])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["splits"]["train"]["n"] == 5 and stats["config"]["task"] == "multisubkey"
    back = gen.load_dataset(tmp_path, "train")
    assert [s.meta["id"] for s in back] == [f"multisubkey-t-s0-train-{i:05d}" for i in range(5)]
