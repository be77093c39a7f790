"""The cost and power planner (kvlib.pipeline.planner) and what feeds it: cost records written where the work is done
(kvlib.engine.meter), rates fitted to them, expected interval widths (kvlib.engine.stats), pre-registered primary
claims in params (kvlib.report.paper.PrimaryClaim) with their own Holm families, the dry run's table and the
refusal of an underpowered run."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats

from kvlib.engine import meter, models, stats
from kvlib.engine.config import ParamError, from_mapping
from kvlib.engine.io import dumps_json
from kvlib.pipeline import cli, notebooks, planner, rejudge, repro_map, reproduce
from kvlib.report import paper
from kvlib.tasks import mdqa

ROOT = Path(__file__).resolve().parents[1]
TAGS = {"backend": "hf", "numerics": "float32", "device": "cpu", "machine": "cpu: test x 2 cores",
        "parameters": 1000}


def _record(kind: str, parts: dict, seconds: float | None = None, tags: dict | None = None, **extra) -> dict:
    total = sum(p.get("seconds", 0.0) for p in parts.values()) if seconds is None else seconds
    return {"kind": kind, "tags": tags or TAGS, "prompts": 1, "cached": 0, "prompt_tokens": 0, "budget_tokens": 0,
            "parts": parts, "seconds": total, **extra}


# ------------------------------------------------------------------------------------------ cost records


def test_rates_are_recovered_exactly_from_records_of_known_cost():
    """seconds = a x tokens + b x attention pairs per part: parts timed alone and calls timed only as a whole
    (transformers' generate() cannot tell prefill from decode) together give back a and b."""
    rate = {"prefill": (2e-3, 3e-7), "decode": (1e-2, 5e-6), "train": (6e-3, 2e-7)}

    def cost(part, tokens, attention):
        a, b = rate[part]
        return a * tokens + b * attention

    records = []
    for tokens, attention in ((1000, 400_000), (5000, 12_000_000), (200, 30_000), (3000, 2_000_000)):
        new, new_attention = tokens // 50, tokens * 7
        records.append(_record("generate", {
            "prefill": {"tokens": tokens, "attention": attention, "seconds": cost("prefill", tokens, attention)},
            "decode": {"tokens": new, "attention": new_attention, "seconds": cost("decode", new, new_attention)}}))
        records.append(_record("generate", {"prefill": {"tokens": tokens, "attention": attention * 2},
                                            "decode": {"tokens": new * 3, "attention": new_attention}},
                               seconds=cost("prefill", tokens, attention * 2) + cost("decode", new * 3, new_attention)))
        records.append(_record("train", {"train": {"tokens": tokens, "attention": attention * 3}},
                               seconds=cost("train", tokens, attention * 3)))
    records.append(_record("generate", {}, seconds=0.0, cached=7, prompts=7))  # cache hits: no work, no cost
    fitted = meter.fit_rates(records)
    for part, (a, b) in rate.items():
        assert fitted.per_token[part] == pytest.approx(a, rel=1e-6)
        assert fitted.per_attention[part] == pytest.approx(b, rel=1e-6)
    assert fitted.seconds("decode", 10, 100) == pytest.approx(cost("decode", 10, 100))
    assert meter.fit_rates([records[-1]]) is None  # only cache hits: nothing to fit


def test_attention_pairs_count_what_a_prefix_saves():
    assert meter.attention_pairs(0, 4) == 1 + 2 + 3 + 4
    assert meter.attention_pairs(2, 4) == 3 + 4  # a reused prefix of 2 tokens
    # with the prefix cache, neighbours in token order prefill only what they do not share (at least one token)
    tokens, attention = planner.prefill_per_prompt([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3, 4]], prefix_cache=True)
    assert (tokens, attention) == pytest.approx(((4 + 1 + 1) / 3, (10 + 3 + 4) / 3))
    assert planner.prefill_per_prompt([[1, 2, 3, 4], [1, 2, 9]], prefix_cache=False) == (3.5, 8.0)


def test_cost_json_is_written_atomically_as_a_backend_call_records_its_work(tmp_path):
    """A backend call adds its record through the meter; the response cache's hits are counted at no cost."""
    from kvlib.engine.cache import CachedBackend, ResponseCache

    class FakeBackend:
        name = "fake"
        meter_tags = TAGS

        def identity(self):
            return {"backend": "fake"}

        def generate(self, requests, max_new_tokens, on_result=None, stop=None):
            work = meter.Work("generate", self.meter_tags, prompts=len(requests),
                              budget_tokens=len(requests) * max_new_tokens)
            with work.timed("prefill"):
                for r in requests:
                    work.add("prefill", len(r), meter.attention_pairs(0, len(r)))
            answers = [r.upper() for r in requests]
            for i, answer in enumerate(answers):
                work.add("decode", 2, 2 * len(requests[i]))
                if on_result:
                    on_result(i, answer)
            work.done()
            return answers

    path = tmp_path / "results" / "03_x" / meter.COST_FILE
    meter.point_at(path)
    assert json.loads(path.read_text()) == {"records": []}  # pointed: an empty record at once
    cached = CachedBackend(FakeBackend(), ResponseCache(tmp_path / "cache"))
    assert cached.generate(["abc", "de"], 4) == ["ABC", "DE"]
    assert cached.generate(["abc", "de"], 4) == ["ABC", "DE"]
    first, second = json.loads(path.read_text())["records"]
    assert first["prompts"] == 2 and first["budget_tokens"] == 8 and first["tags"] == TAGS
    assert first["parts"]["prefill"]["tokens"] == 5 and first["parts"]["prefill"]["attention"] == 6 + 3
    assert first["parts"]["prefill"]["seconds"] >= 0 and "seconds" not in first["parts"]["decode"]
    assert second["cached"] == 2 and second["parts"] == {} and second["seconds"] < 1
    assert not list(path.parent.glob(".*.tmp"))  # written through a temp file
    meter.point_at(None)
    cached.generate(["zz"], 4)
    assert len(json.loads(path.read_text())["records"]) == 2  # pointed nowhere: nothing more is kept


def test_the_hf_backend_records_prefill_and_decode_apart(tiny_llama_dir, tmp_path):
    from kvlib.engine.backends import HFBackend

    backend = HFBackend(tiny_llama_dir, device="cpu", dtype="float32", batch_size=2, progress=False)
    meter.point_at(tmp_path / meter.COST_FILE)
    backend.generate(["hello there", "a longer prompt than that one"], 5)
    backend.loglikelihood([("The sky is", " blue"), ("The sky is", " green")])
    generate, loglikelihood = meter.read_records(tmp_path / meter.COST_FILE)
    assert generate["tags"]["numerics"] == "float32" and generate["tags"]["device"] == "cpu"
    assert generate["tags"]["parameters"] == sum(p.numel() for p in backend.model.parameters())
    lengths = backend.prompt_lengths(["hello there", "a longer prompt than that one"])
    assert generate["parts"]["prefill"]["tokens"] == sum(lengths) == generate["prompt_tokens"]
    assert generate["parts"]["prefill"]["attention"] == sum(meter.attention_pairs(0, n) for n in lengths)
    assert 0 < generate["parts"]["decode"]["tokens"] <= 2 * 5 and generate["budget_tokens"] == 10
    assert {"seconds"} <= set(generate["parts"]["prefill"]) and {"seconds"} <= set(generate["parts"]["decode"])
    assert loglikelihood["kind"] == "loglikelihood" and loglikelihood["prompts"] == 2
    assert set(loglikelihood["parts"]) == {"prefill"}


def test_a_training_session_records_the_sequences_it_trained_on(tiny_llama_dir, tmp_path):
    from kvlib.engine.train import TrainConfig, train

    chats = tmp_path / "train.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                                                      {"role": "assistant", "content": str(2 * i)}]}) + "\n"
                             for i in range(4)))
    meter.point_at(tmp_path / meter.COST_FILE)
    summary = train(TrainConfig(train_file=str(chats), out_dir=str(tmp_path / "run"), model=tiny_llama_dir,
                                max_steps=3, gradient_accumulation_steps=1, save_steps=100))
    (record,) = meter.read_records(tmp_path / meter.COST_FILE)
    assert record["kind"] == "train" and record["prompts"] == 3  # 3 optimizer steps of one sequence
    assert record["tags"]["numerics"] == "fp32" and record["tags"]["method"] == "full"
    mean = summary["n_tokens"] / summary["n_examples"]
    assert record["parts"]["train"]["tokens"] == round(3 * mean) and record["seconds"] > 0


def test_a_notebook_points_the_meter_at_its_results(tmp_path, monkeypatch):
    for folder in ("notebooks", "params"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    notebooks.start("01_synthetic_data", {"profile": "quick", "results_dir": "results/quick/.staging",
                                          "datasets": {}}, {})
    meter.Work("generate", TAGS, prompts=1).done()
    records = meter.read_records(tmp_path / "results/quick/.staging/01_synthetic_data/cost.json")
    assert len(records) == 1 and records[0]["prompts"] == 1


# ------------------------------------------------------------------------------------------------ power


def test_expected_half_width_is_the_t_interval_at_the_planned_n():
    n, sd = 200, 0.3
    narrow_floor = stats.planned_table(n, 0.5, 0.05)
    want = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert stats.expected_half_width(n, sd, [narrow_floor]) == pytest.approx(want)
    # a seed group: the seeds' own spread does not shrink with n
    assert stats.expected_half_width(n, sd, [narrow_floor], seed_sd=0.05, seeds=3) == pytest.approx(
        scipy_stats.t.ppf(0.975, n - 1) * math.sqrt(sd ** 2 / n + 0.05 ** 2 / 3))
    # the judged method never goes below Newcombe's interval on the planned table, here a little wider than t
    table = stats.planned_table(n, 0.5, sd)
    _, lo, hi = stats.newcombe_paired_ci(*table)
    assert stats.expected_half_width(n, sd, [table]) == pytest.approx((hi - lo) / 2)
    assert (hi - lo) / 2 > want
    # the smallest difference a one-sided test at alpha finds with 80% power, by hand
    half = 0.04
    se = half / scipy_stats.t.ppf(0.975, n - 1)
    want = (scipy_stats.t.ppf(1 - 0.0125, n - 1) + scipy_stats.t.ppf(0.8, n - 1)) * se
    assert stats.detectable_difference(half, n, alpha=0.0125) == pytest.approx(want)


def test_expected_half_width_matches_the_interval_the_claim_gets():
    """Per-question means of a finetune and the original (a single model: paired t floored by Newcombe on the
    soft table): the width planned from their spread at the same n is the width the test then gives."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=300) / 3  # a question's mean over 3 positions
    x = np.clip(y + rng.choice([-1 / 3, 0, 0, 1 / 3], size=300), 0, 1)
    test = stats.paired_difference_test(x, y)
    unit_sd, seed_sd = stats.seed_item_spread((x - y)[None, :])
    assert seed_sd == 0.0
    planned = stats.expected_half_width(300, unit_sd, [stats.planned_table(300, float(y.mean()), unit_sd)])
    assert planned == pytest.approx((test.ci_high - test.ci_low) / 2, rel=0.03)


def test_zero_spread_gives_the_newcombe_floor_never_a_zero_width():
    n, p = 50, 0.3
    floor = stats.expected_half_width(n, 0.0, [stats.planned_table(n, p, 0.0)])
    _, lo, hi = stats.newcombe_paired_ci(n * p, 0, 0, n * (1 - p))
    assert floor == pytest.approx((hi - lo) / 2) and floor > 0.02
    # every seed agreeing on every unit: no seed spread, the floor still
    same = np.tile(np.array([0.0, 1.0, 0.0]), (3, 1))
    assert stats.seed_item_spread(same)[1] == 0.0


def test_tiny_n():
    sd = 0.4
    assert stats.expected_half_width(2, sd, [stats.planned_table(2, 0.5, sd)]) == pytest.approx(
        max(scipy_stats.t.ppf(0.975, 1) * sd / math.sqrt(2), 0.0))
    assert stats.expected_half_width(1, sd, [stats.planned_table(1, 0.5, sd)]) == math.inf
    assert stats.detectable_difference(math.inf, 1) == math.inf
    with pytest.raises(ValueError, match="one table .* or two"):
        stats.expected_half_width(10, sd, [])


def test_the_between_seed_spread_is_what_item_sampling_does_not_explain():
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.3, size=(3, 4000))
    alike = noise + 0.1  # seeds differ only by their items' noise
    apart = noise + np.array([[0.0], [0.2], [0.4]])  # seed means 0.2 apart
    assert stats.seed_item_spread(alike)[1] < 0.01
    assert stats.seed_item_spread(apart)[1] == pytest.approx(0.2, abs=0.02)


# --------------------------------------------------------------------------------- pre-registration


def _mdqa_params(**primary):
    entry = {"artifact": "fig5", "model": "kv", "setting": "random", "max_half_width": 3.0, **primary}
    return {"profile": "quick", "models": {"original": {}, "kv": {"model": "smollm2-135m-instruct", "synthetic": True}},
            "settings": ["random"], "primary": [entry]}


@pytest.mark.parametrize("change, message", [
    ({"model": "nope"}, r"primary\[0\]\.model: 'nope' is not a model or seed group this notebook judges"),
    ({"max_half_width": 0}, r"primary\[0\]\.max_half_width: must be > 0"),
    ({"max_half_width": -2}, r"primary\[0\]\.max_half_width: must be > 0"),
    ({"setting": "retrieved"}, r"primary\[0\]\.setting: fig5 is judged in setting random"),
    ({"artifact": "table1"}, r"primary\[0\]\.artifact: 'table1' is not judged by this notebook"),
    ({"artifact": "fig99"}, r"primary\[0\]\.artifact: unknown paper artifact 'fig99'"),
    ({"artifact": "fig10", "setting": "contrast"}, r"contrast needs settings \['random', 'retrieved'\]"),
])
def test_primary_claims_are_validated_with_one_line_naming_the_field(change, message):
    with pytest.raises(ParamError, match=message) as err:
        from_mapping(notebooks.MDQANotebookParams, _mdqa_params(**change))
    assert "\n" not in str(err.value)


def test_general_primary_claims_name_a_benchmark_the_notebook_runs():
    base = {"profile": "quick", "models": {"original": {}, "kv": {"model": "smollm2-135m-instruct", "synthetic": True}},
            "tasks": {"hellaswag": {"max_examples": 10}}}
    ok = from_mapping(notebooks.GeneralBenchmarksNotebookParams, {**base, "primary": [
        {"artifact": "table1", "model": "kv", "benchmark": "hellaswag", "max_half_width": 2.19}]})
    assert ok.primary[0].benchmark == "hellaswag"
    with pytest.raises(ParamError, match=r"primary\[0\]\.benchmark: 'mmlu' is not one of this notebook's tasks"):
        from_mapping(notebooks.GeneralBenchmarksNotebookParams, {**base, "primary": [
            {"artifact": "table1", "model": "kv", "benchmark": "mmlu", "max_half_width": 2.19}]})
    with pytest.raises(ParamError, match=r"primary\[0\]\.metric: hellaswag is scored on \['acc', 'acc_norm'\]"):
        from_mapping(notebooks.GeneralBenchmarksNotebookParams, {**base, "primary": [
            {"artifact": "table1", "model": "kv", "benchmark": "hellaswag", "metric": "em", "max_half_width": 1}]})


def test_the_cpu_profile_pre_registers_its_main_claims():
    mdqa_params = yaml.safe_load((ROOT / "params/cpu/03_mdqa.yaml").read_text())["primary"]
    widths = {(c["artifact"], c["setting"]): c["max_half_width"] for c in mdqa_params}
    assert set(widths) == {("fig5", "random"), ("fig10", "retrieved"), ("fig10", "contrast")}
    # the finetune's gain with each kind of distractor to +-3 points; the random-minus-retrieved contrast, a
    # difference of two gains on the 441 questions available offline, at the width those questions allow
    assert widths[("fig5", "random")] <= 3 and widths[("fig10", "retrieved")] <= 3
    assert widths[("fig10", "contrast")] <= 4
    general_params = yaml.safe_load((ROOT / "params/cpu/05_general_benchmarks.yaml").read_text())["primary"]
    assert {c["benchmark"] for c in general_params} == set(paper.BENCHMARKS)
    for name in ("quick", "smoke"):  # no pre-registration: their claims and families stay as they were
        for nb in ("03_mdqa", "05_general_benchmarks"):
            assert "primary" not in yaml.safe_load((ROOT / f"params/{name}/{nb}.yaml").read_text())


def _pooled(model, setting, p_increase, p_no_gain=0.5):
    return {"model": model, "setting": setting, "delta_correct": 0.1, "ci_low": 0.01, "ci_high": 0.2,
            "n_pairs": 50, "p_increase": p_increase, "p_decrease": 0.99, "p_no_loss": 0.001, "p_no_gain": p_no_gain,
            "ci_method": "test"}


def test_primary_claims_are_their_own_holm_family_and_the_rest_exploratory():
    pooled = [_pooled(m, "R", p) for m, p in (("a", 0.02), ("b", 0.004), ("c", 0.3))]
    without = paper.mdqa_claims(pooled, ["a", "b", "c"], "R", "T")
    assert paper.ROLE not in without[0] and {r["family_size"] for r in without} == {3}
    assert [r["verdict"] for r in without] == ["inconclusive", "holds", "inconclusive"]  # Holm over three
    primary = [paper.PrimaryClaim("fig5", "a", 3.0, setting="random")]
    rows = paper.mdqa_claims(pooled, ["a", "b", "c"], "R", "T", primary=primary)
    by_model = {r["model"]: r for r in rows}
    assert by_model["a"][paper.ROLE] == paper.PRIMARY and by_model["a"]["family_size"] == 1
    assert by_model["a"]["verdict"] == "holds"  # alone in its family: p 0.02 < 0.025
    assert {by_model[m][paper.ROLE] for m in "bc"} == {paper.EXPLORATORY}
    assert {by_model[m]["family_size"] for m in "bc"} == {2}
    assert [by_model[m]["verdict"] for m in "bc"] == ["holds", "inconclusive"]
    assert by_model["a"][paper.HALF_WIDTH] == pytest.approx(9.5) and by_model["a"][paper.MAX_HALF_WIDTH] == 3.0
    assert by_model["b"][paper.MAX_HALF_WIDTH] is None
    # the claims figure labels a primary claim with the width it reached, the map's verdict cell says it too
    forest = {r["model"]: r for r in paper.forest_rows(rows)}
    assert forest["a"]["label"].startswith("PRIMARY (\u00b19.50 of \u00b13 pre-registered)")
    assert forest["b"]["role"] == paper.EXPLORATORY and not forest["b"]["label"].startswith("PRIMARY")
    note = repro_map.primary_note(paper.claim_facts(__import__("pandas").DataFrame(rows)))
    assert note == "primary: holds (a, improves MDQA, random distractors: holds, \u00b19.50 of \u00b13 points)"


def test_figure_and_map_print_one_half_width():
    # a printed interval of [+4.5, +10.8] spans 6.300000000000001 / 2, which rounds one way, and the recorded
    # half-width 3.15 the other at one decimal: the figure and the map must print the recorded one, alike
    row = {"artifact": "fig5", "claim": "synthetic finetuning improves MDQA, random distractors", "model": "a",
           "ci": "[+4.5, +10.8]", "delta": 7.6, "unit": "points", "verdict": "holds", paper.ROLE: paper.PRIMARY,
           paper.HALF_WIDTH: 3.15, paper.MAX_HALF_WIDTH: 3.0}
    label = paper.forest_rows([row])[0]["label"]
    note = repro_map.primary_note([row])
    assert label.startswith("PRIMARY (\u00b13.15 of \u00b13 pre-registered)")
    assert note == "primary: holds (a, improves MDQA, random distractors: holds, \u00b13.15 of \u00b13 points)"
    # an inconclusive primary claim says what its interval rules out (a re-judged record's claim, whose interval
    # is new_ci, reaches the map through rejudge.figure_claims); a claim without an interval, or one that holds,
    # does not
    bound = {**row, "verdict": "inconclusive", "ci": "[-3.0, +2.6]", paper.HALF_WIDTH: 2.8}
    assert repro_map.primary_note([bound]).endswith(
        "inconclusive, \u00b12.80 of \u00b13 points, rules out differences outside [-3.0, +2.6])")
    rejudged = {k: v for k, v in bound.items() if k not in ("ci", "verdict")}
    record = {"claims": [{**rejudged, "new_verdict": "inconclusive", "new_ci": "[-3.0, +2.6]"}]}
    assert repro_map.primary_note(rejudge.figure_claims(record, [])) == repro_map.primary_note([bound])
    assert "rules out" not in repro_map.primary_note([{**bound, "ci": ""}]) + note
    # a row without the recorded column (an older claims table) falls back to its interval; none: "no interval"
    older = {k: v for k, v in row.items() if k != paper.HALF_WIDTH}
    assert paper.forest_rows([older])[0]["half_width"] == pytest.approx(3.15)
    assert paper.forest_rows([{**older, "ci": ""}])[0]["label"].startswith("PRIMARY (no interval of")


def test_general_primary_claims_match_benchmark_and_metric():
    floor = {"model": "ft", "task": "triviaqa", "metric": "em", "n": 300, "delta": 0.0, "ci_low": -0.01,
             "ci_high": 0.01, "p_no_loss": 0.001, "p_decrease": 0.5, "baseline_value": 0.0,
             "baseline_ci_low": 0.0, "baseline_ci_high": 0.01}
    lenient = {**floor, "metric": "contains", "delta": 0.01, "ci_low": -0.01, "ci_high": 0.03, "baseline_value": 0.1,
               "baseline_ci_low": 0.07, "baseline_ci_high": 0.14}
    primary = [paper.PrimaryClaim("table1", "ft", 2.19, benchmark="triviaqa", metric="contains")]
    rows = paper.general_claims([floor, lenient], ["ft"], {"triviaqa": "em"}, {"triviaqa": "TriviaQA"},
                                primary=primary)
    roles = {r["claim"]: r[paper.ROLE] for r in rows}
    assert roles["synthetic finetuning loses nothing on TriviaQA"] == paper.EXPLORATORY
    (primary_claim,) = [r for r, role in roles.items() if role == paper.PRIMARY]
    assert primary_claim.startswith("synthetic finetuning loses nothing on TriviaQA (contains;")


# ------------------------------------------------------------------------------------ the dry run


PROFILE = "fixture"


def _items(n_questions: int) -> list[dict]:
    """MDQA item rows of an earlier run: the original and two seeds of a finetune, both settings, 2 positions."""
    rng = np.random.default_rng(0)
    rows = []
    for model in ("original", "kv s0", "kv s1"):
        for setting in (mdqa.SETTING_RANDOM, mdqa.SETTING_RETRIEVED):
            for q in range(n_questions):
                for position in (1, 5):
                    rows.append({"model": model, "setting": setting, "qid": f"q{q}", "position": position,
                                 "correct": float(rng.random() < 0.4)})
    return rows


@pytest.fixture
def fixture_repo(tmp_path):
    """A profile with notebook 03 only (its real notebook and params class): a finetune pre-registered on Fig. 5
    with a width 40 earlier questions cannot reach, earlier items and cost records in its results folder."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / "03_mdqa.ipynb", tmp_path / "notebooks")
    params = tmp_path / "params" / PROFILE
    params.mkdir(parents=True)
    entry = {"model": "smollm2-135m-instruct", "synthetic": True}
    (params / "03_mdqa.yaml").write_text(yaml.safe_dump({
        "models": {"original": {"model": "smollm2-135m-instruct"}, "kv s0": entry, "kv s1": entry},
        "seed_groups": {"kv": ["kv s0", "kv s1"]}, "settings": ["random", "retrieved"], "num_documents": 5,
        "positions": [1, 5], "num_questions": 20, "max_new_tokens": 8,
        "primary": [{"artifact": "fig5", "model": "kv", "setting": "random", "max_half_width": 3.0},
                    {"artifact": "fig10", "model": "kv", "setting": "contrast", "max_half_width": 40.0}]},
        sort_keys=False))
    results = tmp_path / "results" / PROFILE / "03_mdqa"
    results.mkdir(parents=True)
    import pandas as pd

    pd.DataFrame(_items(40)).to_csv(results / "mdqa_items.csv", index=False)
    tags = {"backend": "hf", "numerics": "float32", "device": "cpu", "machine": meter.machine("cpu"),
            "parameters": models.parameter_count("smollm2-135m-instruct")}
    records = [_record("generate", {"prefill": {"tokens": t, "attention": t * t // 2, "seconds": 1e-3 * t},
                                    "decode": {"tokens": 40, "attention": 40 * t, "seconds": 0.5}},
                       tags=tags, budget_tokens=80) for t in (500, 1000, 2000)]
    (results / meter.COST_FILE).write_text(dumps_json({"records": records}))
    return tmp_path


def _run(root: Path, **kwargs) -> int:
    return reproduce.run_profile(PROFILE, results_root=root / "results", params_root=root / "params",
                                 notebooks_dir=root / "notebooks", **kwargs)


def test_dry_run_prints_the_cost_and_power_table(fixture_repo, capsys):
    assert _run(fixture_repo, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "Cost plan on this machine" in out and "smollm2-135m-instruct's tokenizer" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("03_mdqa ") and ":" in line)
    assert "prefill measured (fixture)" in row and "decode measured (fixture)" in row and "overhead prior" in row
    assert "decoded 50% of the token budget" in row
    assert "MDQA random, 5 documents: 3 model(s) x 40 prompts" in out
    fig5 = next(line for line in out.splitlines() if "fig5 kv random" in line and "TOO WIDE" in line)
    assert " 20 " in fig5 and "(n ~ " in fig5
    contrast = next(line for line in out.splitlines() if "fig10 kv contrast" in line and "+-40" in line)
    assert contrast.rstrip().endswith("OK")
    assert "results/fixture/03_mdqa/mdqa_items.csv: 40 questions, 2 seeds" in out
    assert "refuses to start this profile unless --allow-underpowered" in out


def test_an_underpowered_run_stops_before_compute_unless_allowed(fixture_repo, capsys, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("a notebook ran")

    monkeypatch.setattr(reproduce, "run_job", no_compute)
    assert _run(fixture_repo) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("- ")]
    assert len(problems) == 1, err
    assert "params/fixture/03_mdqa.yaml: primary[0].max_half_width: fig5 kv random is expected to reach" in problems[0]
    assert "raise num_questions to about" in problems[0] and "--allow-underpowered" in problems[0]
    with pytest.raises(AssertionError, match="a notebook ran"):
        _run(fixture_repo, allow_underpowered=True)
    rc = cli.main(["reproduce", "--profile", PROFILE, "--results", str(fixture_repo / "results"), "--params-dir",
                   str(fixture_repo / "params"), "--notebooks", str(fixture_repo / "notebooks"), "--concurrent"])
    assert rc == 2 and "cannot reach their interval width" in capsys.readouterr().err


def test_without_earlier_items_the_stated_prior_plans_the_claim(fixture_repo, capsys):
    (fixture_repo / "results" / PROFILE / "03_mdqa" / "mdqa_items.csv").unlink()
    path = fixture_repo / "params" / PROFILE / "03_mdqa.yaml"
    data = yaml.safe_load(path.read_text())
    data["primary"][0]["prior_sd"] = 30.0
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = planner.plan_profile_cost(PROFILE, reproduce.plan_run(
        PROFILE, None, fixture_repo / "params", fixture_repo / "notebooks", fixture_repo / "results").jobs,
        fixture_repo / "results" / PROFILE, fixture_repo / "results", fixture_repo / "params", with_cost=False)
    stated, unstated = plan.claims
    assert "the stated prior: primary[0].prior_sd 30 points" in stated.basis
    assert stated.half_width == pytest.approx(100 * stats.expected_half_width(
        20, 0.3, [stats.planned_table(20, 0.5, 0.3)]))
    assert unstated.status == "NO ESTIMATE" and "state primary[1].prior_sd" in unstated.problem()


@pytest.mark.parametrize("original_correct, status", [(0.0, "UNTESTABLE"), (1.0, "NO ESTIMATE")])
def test_too_few_earlier_items_plan_no_width_but_show_an_original_at_floor(fixture_repo, original_correct, status):
    """Fewer earlier units than MIN_SPREAD_UNITS plan no width; the original's level there still marks a claim
    expected untestable (it stops nothing); an original above floor leaves it without an estimate (it stops)."""
    import pandas as pd

    rows = [{**r, "correct": original_correct} if r["model"] == "original" else r
            for r in _items(planner.MIN_SPREAD_UNITS - 20)]
    pd.DataFrame(rows).to_csv(fixture_repo / "results" / PROFILE / "03_mdqa" / "mdqa_items.csv", index=False)
    plan = planner.plan_profile_cost(PROFILE, reproduce.plan_run(
        PROFILE, None, fixture_repo / "params", fixture_repo / "notebooks", fixture_repo / "results").jobs,
        fixture_repo / "results" / PROFILE, fixture_repo / "results", fixture_repo / "params", with_cost=False)
    random = plan.claims[0]
    assert random.status == status and random.half_width is None
    few = planner.MIN_SPREAD_UNITS - 20
    assert f"{few} questions, 2 seeds, too few to plan a width with (at least {planner.MIN_SPREAD_UNITS})" in random.basis
    if status == "UNTESTABLE":
        assert random.untestable.startswith("the original's 0.0% [0.0, ") and random.problem() is None
    else:
        assert not random.untestable and "state primary[0].prior_sd" in random.problem()


def test_rates_come_from_the_profile_then_other_profiles_then_the_prior(tmp_path):
    key = meter.rate_key("generate", TAGS)
    own, other = tmp_path / "results" / "mine", tmp_path / "results" / "theirs"
    for folder, rate in ((own, 1e-3), (other, 5e-3)):
        (folder / "03_x").mkdir(parents=True)
    (other / "03_x" / meter.COST_FILE).write_text(dumps_json({"records": [
        _record("generate", {"prefill": {"tokens": 100, "attention": 0, "seconds": 0.5}})]}))
    prior = from_mapping(planner.PlannerParams, {"priors": {"cpu": {
        "parameters": 500, "prefill": {"per_token": 1e-4}, "decode": {"per_token": 2e-4}}}})
    book = planner.RateBook(own, tmp_path / "results", prior, "params/planner.yaml")
    rate, basis = book.rate(key, "prefill")
    assert rate.per_token == pytest.approx(5e-3) and basis == "measured on another profile (theirs)"
    rate, basis = book.rate(key, "decode")  # scaled from 500 to 1000 parameters
    assert rate.per_token == pytest.approx(4e-4) and basis == "prior (params/planner.yaml)"
    assert book.rate(meter.rate_key("generate", {**TAGS, "device": "cuda"}), "prefill") is None
    (own / "03_x" / meter.COST_FILE).write_text(dumps_json({"records": [
        _record("generate", {"prefill": {"tokens": 100, "attention": 0, "seconds": 0.1}})]}))
    book = planner.RateBook(own, tmp_path / "results", prior, "params/planner.yaml")
    assert book.rate(key, "prefill")[0].per_token == pytest.approx(1e-3)
    assert book.rate(key, "prefill")[1] == "measured (mine)"


def test_planner_priors_are_validated(tmp_path):
    (tmp_path / planner.PLANNER_FILE).write_text("priors: {cpu: {parameters: 10, prefill: {per_token: -1}}}\n")
    with pytest.raises(ParamError, match=r"planner.yaml: priors.cpu.prefill.per_token: must be >= 0"):
        planner.load_planner_params(tmp_path)
    params, source = planner.load_planner_params(ROOT / "params")
    assert source.endswith("params/planner.yaml") and params.priors["cpu"].parameters > 0


def test_spread_comes_from_a_relabelled_run_and_never_from_a_handful_of_questions():
    class P:  # an MDQA notebook whose finetune, run kv-run, was "kv s0" in the earlier items
        models = {"original": {}, "kv": {}}
        seed_groups: dict = {}

        @staticmethod
        def model_configs():
            return {"original": SimpleNamespace(run=None), "kv": SimpleNamespace(run="kv-run")}

    def rows(n):
        out = _items(n)
        for r in out:
            r["model_spec"] = {"original": "smollm2-135m-instruct", "kv s0": "runs/models/p/kv-run/model",
                               "kv s1": "runs/models/p/other-run/model"}[r["model"]]
        return out

    assert planner._file_labels(rows(2), P, ["original", "kv"]) == ["original", "kv s0"]
    assert planner._file_labels([r for r in rows(2) if r["model"] != "kv s0"], P, ["original", "kv"]) is None
    claim = paper.PrimaryClaim(artifact="fig5", model="kv", setting="random", max_half_width=3)
    for n, found in ((planner.MIN_SPREAD_UNITS - 1, False), (planner.MIN_SPREAD_UNITS, True)):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "03_mdqa").mkdir()
            pd.DataFrame(rows(n)).to_csv(Path(tmp) / "03_mdqa" / "mdqa_items.csv", index=False)
            got = planner._spread_from_items("03_mdqa", P, claim, [Path(tmp)])
        assert (got is not None) == found, n
        if found:
            assert got[0].units == n and "kv as kv s0" in got[1]
