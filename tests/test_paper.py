"""params/paper_reference.yaml: validated on load, consistent with itself, and a malformed file fails clearly."""
from __future__ import annotations

import math

import pytest

from kvlib.report import paper
from kvlib.engine.config import ParamError
from kvlib.pipeline import repro_map
from kvlib.pipeline import rejudge


def test_reference_loads_and_has_the_published_rows():
    ref = paper.load()
    scores = ref.general_scores()
    assert scores["Mistral-7B-Instruct-v0.1: original"]["triviaqa"] == 47.63
    assert scores["GPT-3.5 Turbo (1106): key-value, with template"] == {"mmlu": 67.75, "gsm8k": 71.65}
    assert {"mistral", "gpt35"} <= set(ref.training)


def test_table2_triviaqa_range_claim_matches_table2_rows():
    """The recorded Table 2 range is what Table 2's own rows give (the abstract's range differs; kept apart)."""
    scores = paper.load().general_scores()
    original = scores["Mistral-7B-Instruct-v0.1: original"]["triviaqa"]
    drops = [original - scores[f"Mistral-7B-Instruct-v0.1: {b}"]["triviaqa"]
             for b in ("MultidocQA", "IN2", "needle-in-a-haystack")]
    assert [round(min(drops), 2), round(max(drops), 2)] == paper.load().claim("triviaqa_drop_baselines_table2")["range"]
    assert paper.load().claim("triviaqa_drop_baselines_abstract")["range"] == [2.33, 6.19]


def test_tables_render():
    table = paper.general_table({"mmlu": "MMLU"})
    assert "MMLU" in table.columns and len(table) == 7
    assert set(paper.claims_table()["id"]) == set(paper.load().claims)


@pytest.mark.parametrize("text, message", [
    ("general_benchmarks: [{model: m, finetuning: f, source: s, scores: {mmlu: 153}}]", "percentage in [0, 100]"),
    ("general_benchmarks: [{model: m, finetuning: f, source: s, scores: {mmluu: 50}}]", "unknown benchmark"),
    ("general_benchmarks: [{model: m, source: s, scores: {mmlu: 50}}]", "missing ['finetuning']"),
    ("claims: [{id: a, source: s, unit: points, text: t}]", "exactly one of value or range"),
    ("claims: [{id: a, source: s, unit: points, text: t, range: [3, 1]}]", "expected [low, high]"),
    ("tables: {}", "unknown sections"),
])
def test_malformed_reference_fails_with_the_field(tmp_path, text, message):
    path = tmp_path / "ref.yaml"
    path.write_text(text)
    with pytest.raises(ParamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        paper.load(path)


@pytest.mark.parametrize("lo, hi, expect, want", [
    (0.01, 0.2, "increase", "holds"), (-0.1, 0.2, "increase", "inconclusive"), (-0.3, -0.1, "increase", "does not hold"),
    (-0.3, -0.1, "decrease", "holds"), (0.1, 0.3, "decrease", "does not hold"), (-0.1, 0.1, "decrease", "inconclusive"),
    (-0.01, 0.1, "no_loss", "holds"), (-0.1, 0.1, "no_loss", "inconclusive"), (-0.25, 0.0, "no_loss", "inconclusive"),
    (-0.2, -0.01, "no_loss", "does not hold"), (0.01, 0.2, "no_loss", "holds"),
    (-0.1, 0.01, "no_gain", "holds"), (-0.1, 0.1, "no_gain", "inconclusive"), (0.01, 0.2, "no_gain", "does not hold"),
    (-0.2, -0.01, "no_gain", "holds"),
    (math.nan, 0.1, "increase", "not measured"), (None, None, "no_loss", "not measured"),
])
def test_verdict(lo, hi, expect, want):
    assert paper.verdict(lo, hi, expect) == want


def test_no_change_margin_is_the_smallest_loss_the_paper_reports():
    # Table 2's smallest baseline TriviaQA drop, 2.19 points: a CI reaching exactly that far still holds, further not
    assert paper.equivalence_margin() == pytest.approx(0.0219)
    assert paper.verdict(-0.0219, 0.05, "no_loss") == "holds"
    assert paper.verdict(-0.0220, 0.05, "no_loss") == "inconclusive"
    assert paper.verdict(-0.05, 0.0219, "no_gain") == "holds"
    assert paper.verdict(-0.1, 0.1, "no_loss", margin=0.2) == "holds"
    with pytest.raises(ValueError, match="margin"):
        paper.verdict(-0.1, 0.1, "no_loss", margin=-0.01)


def test_judge_reports_float_noise_as_zero():
    row = paper.judge("fig5", "c", "m", {"delta": -1.85e-17, "ci_low": -0.3, "ci_high": 0.3, "n": 3}, "increase")
    assert row["delta"] == 0.0 and str(row["delta"]) == "0.0"


def test_verdict_and_judge_reject_unknown_names():
    with pytest.raises(ValueError, match="expect"):
        paper.verdict(0, 1, "up")
    with pytest.raises(ValueError, match="unknown paper artifact 'fig99'"):
        paper.judge("fig99", "c", "m", {"delta": 0.1, "ci_low": 0, "ci_high": 0.2}, "increase")


@pytest.mark.parametrize("verdicts, want", [
    (["holds", "holds"], "holds"), (["holds", "inconclusive"], "partly holds"),
    (["inconclusive", "does not hold"], "inconclusive at this n"), (["does not hold"], "does not hold on this model"),
    (["not measured"], "not measured"), (["holds", "not measured"], "holds"),
    (["holds", paper.AT_FLOOR], "holds"), ([paper.AT_FLOOR, "not measured"], paper.AT_FLOOR),
])
def test_artifact_verdict(verdicts, want):
    assert paper.artifact_verdict(verdicts) == want


def test_mdqa_and_general_claims_pick_the_right_artifact_and_direction():
    pooled = [{"model": "ft", "setting": "R", "n_pairs": 50, "delta_correct": 0.1, "ci_low": 0.02, "ci_high": 0.2},
              {"model": "ft", "setting": "T", "n_pairs": 50, "delta_correct": 0.1, "ci_low": 0.02, "ci_high": 0.2},
              {"model": "other", "setting": "R", "n_pairs": 50, "delta_correct": 0.1, "ci_low": 0.02, "ci_high": 0.2}]
    rows = paper.mdqa_claims(pooled, ["ft"], random_label="R", retrieved_label="T")
    assert [(r["artifact"], r["verdict"], r["n"]) for r in rows] == [("fig5", "holds", 50), ("fig10", "does not hold", 50)]
    assert rows[0]["delta"] == pytest.approx(10) and rows[0]["ci"] == "[+2.0, +20.0]" and rows[0]["unit"] == "points"
    deltas = [{"model": "ft", "task": "mmlu", "metric": "acc", "n": 9, "delta": -0.1, "ci_low": -0.2, "ci_high": -0.01},
              {"model": "ft", "task": "mmlu", "metric": "acc_macro", "n": 9, "delta": 0, "ci_low": -0.1, "ci_high": 0.1}]
    general = paper.general_claims(deltas, ["ft"], {"mmlu": "acc"}, {"mmlu": "MMLU"})
    assert [(g["artifact"], g["claim"], g["verdict"]) for g in general] == [
        ("table1", "synthetic finetuning loses nothing on MMLU", "does not hold")]
    floor = [{"model": "ft", "task": "triviaqa", "metric": "em", "n": 300, "value": 0.0, "baseline_value": 0.0,
              "delta": 0.0, "ci_low": 0.0, "ci_high": 0.0},
             {"model": "ft", "task": "nq_open", "metric": "em", "n": 300, "value": 0.01, "baseline_value": 0.0,
              "delta": 0.01, "ci_low": 0.0, "ci_high": 0.02}]
    verdicts = [g["verdict"] for g in paper.general_claims(floor, ["ft"], {"triviaqa": "em", "nq_open": "em"},
                                                            {"triviaqa": "TriviaQA", "nq_open": "NQ-Open"})]
    assert verdicts == [paper.AT_FLOOR, "holds"]  # nothing to lose at 0 is no evidence for the claim
    # a floor metric is judged in its place only at the floor, only when declared, and only for the same model
    lenient = [{"model": m, "task": t, "metric": "contains", "n": 300, "value": 0.1, "baseline_value": 0.12,
                "delta": -0.02, "ci_low": ci, "ci_high": 0.01} for m, t, ci in
               (("ft", "triviaqa", -0.05), ("ft", "nq_open", -0.01), ("other", "triviaqa", 0.0))]
    rows = paper.general_claims(floor + lenient, ["ft"], {"triviaqa": "em", "nq_open": "em"},
                                {"triviaqa": "TriviaQA", "nq_open": "NQ-Open"},
                                floor_metrics={"triviaqa": "contains", "nq_open": "contains"})
    assert [(r["claim"], r["verdict"]) for r in rows] == [
        ("synthetic finetuning loses nothing on TriviaQA", paper.AT_FLOOR),
        ("synthetic finetuning loses nothing on TriviaQA (contains; em is 0 for both models)", "inconclusive"),
        ("synthetic finetuning loses nothing on NQ-Open", "holds")]
    undeclared = paper.general_claims(floor + lenient, ["ft"], {"triviaqa": "em", "nq_open": "em"},
                                      {"triviaqa": "TriviaQA", "nq_open": "NQ-Open"}, floor_metrics={})
    assert [r["verdict"] for r in undeclared] == [paper.AT_FLOOR, "holds"]
    # by default the floor metrics are the general tasks' declarations
    assert len(paper.general_claims(floor + lenient, ["ft"], {"triviaqa": "em", "nq_open": "em"},
                                    {"triviaqa": "TriviaQA", "nq_open": "NQ-Open"})) == 3


def test_reproduction_map_reads_claims_from_the_manifest(tmp_path):
    """Verdicts come from the claims a notebook recorded; links only to files that exist."""
    import json

    out = tmp_path / "results" / "p"
    (out / "03_mdqa").mkdir(parents=True)
    (out / "03_mdqa.html").write_text("x")
    (out / "03_mdqa" / "mdqa_by_position.png").write_bytes(b"png")
    claims = [{"artifact": "fig5", "verdict": "holds"}, {"artifact": "fig5", "verdict": "inconclusive"},
              {"artifact": "fig10", "verdict": "holds"}]
    (out / "manifest.json").write_text(json.dumps({"notebooks": {"03_mdqa": {
        "status": "ok", "params": {"models": {"finetuned": {"run": "r"}, "original": {"model": "tiny"}}},
        "facts": {"claims": claims}}}}))
    rows = {r["artifact"].split(":")[0]: r for r in repro_map.reproduction_map("p", tmp_path / "results",
                                                                            tmp_path / "params", tmp_path)}
    assert rows["Fig. 5"]["verdict"] == "partly holds (1 holds, 1 inconclusive)"
    assert rows["Fig. 10"]["verdict"] == "holds (1 holds)"
    assert rows["Fig. 5"]["notebook"] == "[03_mdqa](results/p/03_mdqa.html)"
    assert rows["Fig. 5"]["results"] == "[mdqa_by_position.png](results/p/03_mdqa/mdqa_by_position.png)"
    assert rows["Fig. 5"]["model"] == "tiny" and rows["Fig. 5"]["params"] == ""  # no params file: no link
    assert rows["Table 1"]["verdict"] == "not run in this profile yet"
    stale = {r["artifact"].split(":")[0]: r for r in repro_map.reproduction_map(
        "p", tmp_path / "results", tmp_path / "params", tmp_path, changed={"03_mdqa": "params changed"})}
    assert stale["Fig. 10"]["verdict"] == ("stale (params changed since this run; kvlib reproduce re-runs it): "
                                           "holds (1 holds)")
    assert stale["Fig. 10"]["results"] == rows["Fig. 10"]["results"]  # what it produced stays linked
    assert stale["Table 1"]["verdict"] == "not run in this profile yet"
    table = repro_map.map_markdown(list(rows.values()))
    assert table.count("\n") == len(paper.load().artifacts) + 2


def _map_profile(tmp_path, notebooks):
    """A profile `p` under tmp_path with empty params and notebooks of the given names; returns its results folder."""
    out = tmp_path / "results" / "p"
    out.mkdir(parents=True)
    (tmp_path / "params" / "p").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    for nb in notebooks:
        (tmp_path / "params" / "p" / f"{nb}.yaml").write_text("{}")
        (tmp_path / "notebooks" / f"{nb}.ipynb").write_text("{}")
    return out


def test_readme_map_section_states_the_wall_time_and_what_has_not_finished(tmp_path):
    """The README states each profile's measured wall time from its manifest (all attempts), and a partial
    profile says which notebooks have not finished, so its total is not read as the whole run."""
    import json

    out = _map_profile(tmp_path, ("01_synthetic_data", "03_mdqa", "08_longer_context"))
    (tmp_path / "params" / "p" / "accelerate_fsdp.yaml").write_text("{}")  # a params file that is no notebook
    (out / "manifest.json").write_text(json.dumps({"notebooks": {
        "01_synthetic_data": {"status": "ok", "wall_seconds": 60, "wall_seconds_all_attempts": 60},
        "03_mdqa": {"status": "ok", "wall_seconds": 600, "wall_seconds_all_attempts": 6540},  # resumed twice
    }}))
    section = repro_map.readme_map_section("p", tmp_path / "results", tmp_path / "params", tmp_path, tmp_path / "notebooks")
    assert section.startswith(repro_map.map_markdown(repro_map.reproduction_map("p", tmp_path / "results",
                                                                         tmp_path / "params", tmp_path)))
    assert "1.8 h for 2 notebooks (minutes: 01 1.0, 03 109.0)" in section
    assert section.rstrip().endswith("Not finished yet: 08_longer_context.")
    from kvlib.pipeline.manifest import wall_time_summary

    line = wall_time_summary(json.loads((out / "manifest.json").read_text())["notebooks"], ["08_longer_context"],
                             {"03_mdqa": "params changed since it ran"})
    assert line.endswith("Not finished yet: 08_longer_context. To run again: 03_mdqa (params changed since it ran).")
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{repro_map.MAP_START.format(profile='p')}\nold\n{repro_map.MAP_END.format(profile='p')}\nb\n")
    assert repro_map.update_readme_map(readme, "p", tmp_path / "results", tmp_path / "params", tmp_path / "notebooks")
    assert readme.read_text().count("Wall time on this machine") == 1
    assert not repro_map.update_readme_map(readme, "p", tmp_path / "results", tmp_path / "params",
                                       tmp_path / "notebooks")  # idempotent


def test_readme_wall_time_names_a_notebook_that_evaluated_an_earlier_training(tmp_path):
    """A notebook whose committed items show it evaluated other weights of a run than the profile's latest
    evaluation of that run (rejudge's `evaluated_weights`, which only a re-run settles) is named to run again, also
    on a fresh clone whose runs/ is empty; one whose stale findings were all re-judged is not."""
    import json

    out = _map_profile(tmp_path, ("03_mdqa", "04_flenqa", "05_general_benchmarks"))
    (out / "manifest.json").write_text(json.dumps({"notebooks": {
        nb: {"status": "ok", "wall_seconds": 60} for nb in ("03_mdqa", "04_flenqa", "05_general_benchmarks")}}))
    weights = "'ft' (run r) evaluated weights 5d2bb37d65, not 642d48b2f2 as 03_mdqa: an earlier training of the run"
    (out / "rejudged.json").write_text(json.dumps({"notebooks": {
        "03_mdqa": {"items": {}, "stale": [], "claims": []},
        "04_flenqa": {"items": {}, "claims": [], "stale": [
            {"change": "evaluated_weights", "reason": weights, "rejudged": False}]},
        "05_general_benchmarks": {"items": {}, "claims": [], "stale": [
            {"change": "numerics", "reason": "evaluated in bfloat16, now float32", "rejudged": True}]}}}))
    section = repro_map.readme_map_section("p", tmp_path / "results", tmp_path / "params", tmp_path, tmp_path / "notebooks")
    assert section.rstrip().endswith(f"To run again: 04_flenqa ({weights}).")
    # the manifest holds 04 up to date, so its map row names the command that re-runs it anyway
    assert f"stale ({weights}; kvlib reproduce --only 04_flenqa --force re-runs it)" in section


def test_readme_maps_cover_every_artifact_are_current_and_every_link_resolves(monkeypatch):
    """The README's maps list every artifact of params/paper_reference.yaml, match what `kvlib map` generates from
    the committed results (re-run it after a notebook re-renders), and every link in the README resolves."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    text = (root / "README.md").read_text()
    for profile in ("cpu", "quick"):
        start, end = repro_map.MAP_START.format(profile=profile), repro_map.MAP_END.format(profile=profile)
        section = text.split(start, 1)[1].split(end, 1)[0]
        for art in paper.load().artifacts:
            assert f"| {art['title']} |" in section, (profile, art["id"])
        current = repro_map.readme_map_section(profile, "results", "params", link_root=root)
        assert section == "\n" + current, f"the README's {profile} map is stale: run kvlib map --update README.md"
    for href in re.findall(r"\]\(([^)#]+)\)", text):
        if not href.startswith(("http://", "https://")):
            assert (root / href).exists(), href


def test_token_loss_claim_pairs_samples_by_index():
    rows = []
    for run, template, base, step in (("t", True, 0.2, 0.01), ("n", False, 1.0, 0.02)):
        for i in range(6):
            sid = f"{run}-s0-eval-{i:05d}"
            rows += [{"run": run, "model": "original", "id": sid, "kind": "format", "loss": base + step * i},
                     {"run": run, "model": "original", "id": sid, "kind": "value", "loss": 5.0},
                     {"run": run, "model": "finetuned", "id": sid, "kind": "format", "loss": 9.0}]
    (claim,) = paper.token_loss_claims(rows, [("t", "n")])
    assert claim["artifact"] == "fig4" and claim["n"] == 6 and claim["unit"] == "nats"
    assert claim["delta"] == pytest.approx(-0.825) and claim["verdict"] == "holds"
    assert claim["ci_method"] == "paired t" and claim["h0"] == "diff >= 0" and claim["p_value"] < 1e-6
    assert paper.token_loss_claims(rows, [("t", "missing")]) == []


# ------------------------------------------------------------------- chance, multiplicity, contrast, re-judging


def _row(delta, lo, hi, p_increase, p_decrease, **extra):
    return {"delta_correct": delta, "ci_low": lo, "ci_high": hi, "n_pairs": 50, "p_increase": p_increase,
            "p_decrease": p_decrease, "p_no_loss": 0.5, "p_no_gain": 0.5, "ci_method": "test", **extra}


def test_a_claim_needs_the_original_clear_of_chance():
    """MMLU at 21.6% (below 25% chance) has nothing to lose: untestable, with the reason, whatever the CI says."""
    below = {"model": "ft", "task": "mmlu", "metric": "acc", "n": 171, "delta": 0.02, "ci_low": -0.01,
             "ci_high": 0.06, "p_no_loss": 0.001, "p_decrease": 0.9, "baseline_value": 0.216,
             "baseline_ci_low": 0.161, "baseline_ci_high": 0.284}
    above = {**below, "task": "hellaswag", "baseline_value": 0.345, "baseline_ci_low": 0.3, "baseline_ci_high": 0.39}
    rows = paper.general_claims([below, above], ["ft"], {"mmlu": "acc", "hellaswag": "acc"},
                                {"mmlu": "MMLU", "hellaswag": "HellaSwag"})
    assert rows[0]["verdict"] == (f"{paper.UNTESTABLE} (the original's acc 21.6% [16.1, 28.4] does not clear chance "
                                  f"25% by 2.19 points)")
    assert math.isnan(rows[0]["p_holm"]) and rows[0]["family_size"] is None  # not a test: in no family
    assert rows[1]["verdict"] == "holds" and rows[1]["family_size"] == 1 and rows[1]["h0"] == "diff <= -2.19 points"
    assert rows[1]["original"] == "acc 34.5% [30.0, 39.0], chance 25%"
    # clearing chance needs the whole interval above chance + margin: 27.19% here
    edge = {**above, "baseline_ci_low": 0.2718}
    assert paper.general_claims([edge], ["ft"], {"hellaswag": "acc"}, {"hellaswag": "H"})[0]["verdict"].startswith(
        paper.UNTESTABLE)
    assert paper.verdict_category(rows[0]["verdict"]) == paper.UNTESTABLE
    assert paper.artifact_verdict([rows[0]["verdict"], "not measured"]) == paper.UNTESTABLE
    assert paper.artifact_verdict([rows[0]["verdict"], "holds"]) == "holds"


def test_holm_decides_the_verdicts_within_each_artifact():
    """Three claims nominally below 0.025 one at a time: after Holm over the figure only the strongest holds, so the
    figure partly holds; one of five at p = 0.02 does not make a figure partly hold."""
    pooled = [_row(0.1, 0.01, 0.2, p, 0.99, model=m, setting="R") for m, p in (("a", 0.004), ("b", 0.02), ("c", 0.024))]
    rows = paper.mdqa_claims(pooled, ["a", "b", "c"], random_label="R", retrieved_label="T")
    from statsmodels.stats.multitest import multipletests

    assert [r["p_holm"] for r in rows] == pytest.approx(multipletests([0.004, 0.02, 0.024], method="holm")[1])
    assert [r["verdict"] for r in rows] == ["holds", "inconclusive", "inconclusive"]
    assert all(r["family_size"] == 3 and r["p_value"] in (0.004, 0.02, 0.024) for r in rows)
    assert paper.artifact_verdict([r["verdict"] for r in rows]) == "partly holds"
    assert paper.holm_families(rows) == rows  # idempotent: adjusts the raw p-values
    many = [_row(0.1, 0.01, 0.2, p, 0.99, model=m, setting="R")
            for m, p in (("a", 0.02), ("b", 0.4), ("c", 0.5), ("d", 0.6), ("e", 0.7))]
    verdicts = [r["verdict"] for r in paper.mdqa_claims(many, list("abcde"), "R", "T")]
    assert verdicts.count("holds") == 0 and paper.artifact_verdict(verdicts) == "inconclusive at this n"
    # the contrary test is adjusted too: "does not hold" needs it below 0.025 after Holm
    against = [_row(-0.1, -0.2, -0.01, 0.99, p, model=m, setting="R") for m, p in (("a", 0.001), ("b", 0.02))]
    assert [r["verdict"] for r in paper.mdqa_claims(against, ["a", "b"], "R", "T")] == ["does not hold"] * 2
    against = [_row(-0.1, -0.2, -0.01, 0.99, p, model=m, setting="R") for m, p in (("a", 0.013), ("b", 0.02))]
    assert [r["verdict"] for r in paper.mdqa_claims(against, ["a", "b"], "R", "T")] == ["inconclusive"] * 2
    assert paper.decide(0.01, 0.5) == "holds" and paper.decide(0.01, 0.01) == "does not hold"
    assert paper.decide(math.nan, 0.5) == "not measured"


def test_fig10_is_judged_as_a_contrast_and_as_no_gain():
    level = {"baseline_value": 0.3, "baseline_ci_low": 0.2, "baseline_ci_high": 0.4}
    pooled = [_row(0.1, 0.02, 0.2, 0.001, 0.99, model="ft", setting="R", **level),
              _row(0.0, -0.01, 0.015, 0.5, 0.5, model="ft", setting="T", p_no_gain=0.001, **level),
              _row(0.1, 0.03, 0.2, 0.002, 0.99, model="ft", setting="C")]
    rows = paper.mdqa_claims(pooled, ["ft"], "R", "T", contrast_label="C")
    assert [(r["artifact"], r["verdict"]) for r in rows] == [("fig5", "holds"), ("fig10", "holds"), ("fig10", "holds")]
    assert rows[2]["claim"].startswith("synthetic finetuning gains more on MDQA with random distractors than with "
                                       "retrieved ones") and rows[2]["family_size"] == 2
    assert rows[2]["original"] == "accuracy 30.0% [20.0, 40.0], floor 0%; accuracy 30.0% [20.0, 40.0], floor 0%"
    floor = {"baseline_value": 0.0, "baseline_ci_low": 0.0, "baseline_ci_high": 0.07}  # original answers nothing
    at_floor = paper.mdqa_claims([{**pooled[0], **floor}, pooled[1], pooled[2]], ["ft"], "R", "T", contrast_label="C")
    assert [paper.verdict_category(r["verdict"]) for r in at_floor] == [paper.UNTESTABLE, "holds", paper.UNTESTABLE]


def test_judge_reads_p_values_off_the_ci_when_a_row_has_none():
    row = paper.judge("fig5", "c", "m", {"delta": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n": 3}, "increase")
    assert row["p_value"] == pytest.approx(0.025) and "normal approximation" in row["ci_method"]


def test_rejudge_recomputes_committed_claims_without_writing(monkeypatch, legacy_results):
    """The legacy cpu results (tests/fixtures/legacy_cpu) re-judged from their item files: the GSM8K hold on a
    collapsed [+0.0, +0.0] CI is gone, MMLU below chance and FLenQA at chance are untestable, and Fig. 10 gains its
    contrast claims."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    results = legacy_results / "cpu"
    before = {p: p.stat().st_mtime for p in results.rglob("*") if p.is_file()}
    general = rejudge.rejudge_claims("05_general_benchmarks", results)
    # the multi-subkey finetune did not learn its own task (02's held-out check, 32.5% of 40 < 50%): not tested
    unlearned = [r for r in general if r["model"] == "finetuned (multi-subkey)"]
    assert unlearned and all(r["verdict"] == f"{paper.NOT_TESTED} (held-out value accuracy 32.5% of 40 < 50%)"
                             for r in unlearned)
    general = [r for r in general if r["model"] != "finetuned (multi-subkey)"]
    gsm8k = [r for r in general if r["claim"] == "synthetic finetuning loses nothing on GSM8K"]
    assert gsm8k and all(r["verdict"].startswith(paper.UNTESTABLE) and "floor 0%" in r["verdict"] for r in gsm8k)
    assert all("+0.0, +0.0" not in r["ci"] for r in general)
    mmlu = [r for r in general if r["claim"] == "synthetic finetuning loses nothing on MMLU"]
    assert mmlu and all("does not clear chance 25%" in r["verdict"] for r in mmlu)
    tested = [r for r in general if not paper.is_untestable(r["verdict"])]
    # judged with the params the committed run used (it pre-registered nothing): one Holm family per artifact
    assert tested and not any(r.get(paper.ROLE) for r in general)
    assert {r["family_size"] for r in tested} == {len(tested)}
    assert all(r["p_holm"] >= r["p_value"] for r in tested)
    flenqa = [r for r in rejudge.rejudge_claims("04_flenqa", results) if r["model"] != "finetuned (multi-subkey)"]
    assert flenqa and all("balanced accuracy" in r["verdict"] and "chance 50%" in r["verdict"] for r in flenqa)
    mdqa = rejudge.rejudge_claims("03_mdqa", results)
    contrast = [r for r in mdqa if r["claim"].startswith("synthetic finetuning gains more")]
    assert len(contrast) == 3 and {r["artifact"] for r in contrast} == {"fig10"} and all(r["n"] == 50 for r in contrast)
    (fig9,) = rejudge.rejudge_claims("08_longer_context", results)
    # the long finetune scored 0 of 20 on its own held-out task (02's committed heldout_accuracy.csv): not tested
    assert fig9["artifact"] == "fig9" and fig9["verdict"].startswith(paper.NOT_TESTED) and "0.0% of 20" in fig9["verdict"]
    assert {p: p.stat().st_mtime for p in results.rglob("*") if p.is_file()} == before
    old = [{"artifact": "fig9", "claim": fig9["claim"], "model": fig9["model"], "ci": "[0, 1]", "verdict": "holds"}]
    (side,) = rejudge.compare_claims(old, [fig9])
    assert side["old_verdict"] == "holds" and side["new_verdict"] == fig9["verdict"]
    with pytest.raises(ValueError, match="no claims to re-judge"):
        rejudge.rejudge_claims("07_kv_retrieval", results)


def test_fig9_is_not_tested_for_a_finetune_that_did_not_learn_its_task():
    """Transfer from a finetune that scores 0 on its own held-out task is not evidence either way: the claim says
    "not tested" with the measured accuracy, stays out of the Holm family, and the artifact verdict says so."""
    from kvlib.pipeline.runs import not_learned_reason
    from kvlib.report import paper

    row = {"model": "long", "setting": "random", "delta_correct": 0.05, "ci_low": -0.03, "ci_high": 0.14,
           "p_increase": 0.1, "p_decrease": 0.9, "baseline_value": 0.3, "baseline_ci_low": 0.2,
           "baseline_ci_high": 0.4}
    judged = paper.longer_context_claims([row], ["long"], 45)
    assert [c["verdict"] for c in judged] == ["inconclusive"] and judged[0]["family_size"] == 1
    (claim,) = paper.mark_not_tested(judged, {"long": not_learned_reason(0.0, 20, 0.5)})
    assert claim["verdict"] == f"{paper.NOT_TESTED} (held-out value accuracy 0.0% of 20 < 50%)"
    assert claim["family_size"] is None and math.isnan(claim["p_holm"]) and claim["ci"] == judged[0]["ci"]
    assert paper.artifact_verdict([claim["verdict"]]) == paper.NOT_TESTED
    assert not_learned_reason(0.8, 20, 0.5) is None and not_learned_reason(0.5, 20, 0.5) is None  # reaching it is enough
    assert paper.mark_not_tested(judged, {}) == judged
    assert paper.not_tested_reason(claim["verdict"]) == "held-out value accuracy 0.0% of 20 < 50%"
    assert paper.not_tested_reason(paper.NOT_TESTED) == paper.not_tested_reason("inconclusive") == ""
    # the claims figure writes the reason where the interval would be; a row merely without numbers says so
    (row,) = paper.forest_rows([{**claim, "ci": "", "delta": ""}])
    assert row["ci_low"] is None and row["no_interval"] == "not tested: held-out value accuracy 0.0% of 20 < 50%"
    (row,) = paper.forest_rows([{**judged[0], "ci": "", "delta": ""}])
    assert row["no_interval"] == "no interval recorded"
    assert paper.forest_rows([claim])[0]["no_interval"] is None


def _claims_csv_rows():
    """Claims rows as a notebook's claims.csv holds them (strings, as csv.DictReader gives them)."""
    return [
        {"artifact": "table1", "claim": "synthetic finetuning loses nothing on MMLU", "model": "ft", "delta": "2.3",
         "ci": "[-1.5, +6.3]", "unit": "points", "h0": "diff <= -2.19 points", "verdict": "holds",
         "published_delta_points": "Mistral-7B-Instruct-v0.1: +0.02; GPT-3.5 Turbo (1106): -0.32"},
        {"artifact": "fig5", "claim": "synthetic finetuning improves MDQA, random distractors (mean over positions)",
         "model": "ft", "delta": "5.3", "ci": "[-0.7, +11.3]", "unit": "points", "verdict": "inconclusive",
         "published_delta_points": ""},
        {"artifact": "fig10", "claim": "synthetic finetuning does not improve MDQA with retrieved distractors",
         "model": "ft", "delta": "4.0", "ci": "[-3.3, +10.7]", "unit": "points", "verdict": "inconclusive"},
        {"artifact": "table1", "claim": "synthetic finetuning loses nothing on TriviaQA", "model": "ft",
         "delta": "0.0", "ci": "[+0.0, +0.0]", "unit": "points", "verdict": paper.AT_FLOOR},
        {"artifact": "fig4", "claim": "the answer template lowers the original model's loss on formatting tokens",
         "model": "original", "delta": "-0.67", "ci": "[-0.729, -0.620]", "unit": "nats", "verdict": "holds"},
        {"artifact": "fig9", "claim": "finetuning on long key-value prompts improves MDQA", "model": "long",
         "verdict": "inconclusive"},  # recorded in the manifest without its numbers
    ]


def test_forest_rows_assemble_the_claims_figure():
    rows = paper.forest_rows(_claims_csv_rows(), notes={"fig5": "stale"})
    assert [r["artifact"] for r in rows] == ["fig4", "fig5", "fig9", "fig10", "table1", "table1"]  # paper order
    by = {(r["artifact"], r["claim"][-7:]): r for r in rows}
    mmlu = by[("table1", "on MMLU")]
    assert (mmlu["delta"], mmlu["ci_low"], mmlu["ci_high"], mmlu["unit"]) == (2.3, -1.5, 6.3, "points")
    assert mmlu["expect"] == "no_loss" and mmlu["margin"] == pytest.approx(2.19)  # the band, in points
    assert mmlu["published"] == {"Mistral-7B-Instruct-v0.1": 0.02, "GPT-3.5 Turbo (1106)": -0.32}
    assert mmlu["heading"].startswith("Table 1:") and mmlu["label"] == "ft: loses nothing on MMLU"
    fig5 = next(r for r in rows if r["artifact"] == "fig5")
    assert fig5["expect"] == "increase" and fig5["margin"] is None and fig5["published"] == {}
    assert fig5["heading"].endswith("(stale)")
    fig10 = next(r for r in rows if r["artifact"] == "fig10")
    assert fig10["expect"] == "no_gain" and fig10["margin"] == pytest.approx(2.19)  # read off the wording
    floor = by[("table1", "riviaQA")]
    assert floor["category"] == paper.AT_FLOOR and (floor["ci_low"], floor["ci_high"]) == (0.0, 0.0)
    fig4 = rows[0]
    assert fig4["unit"] == "nats" and fig4["expect"] == "decrease" and fig4["margin"] is None
    assert (fig4["ci_low"], fig4["ci_high"]) == (-0.729, -0.62)
    fig9 = next(r for r in rows if r["artifact"] == "fig9")
    assert fig9["ci_low"] is None and fig9["delta"] is None  # drawn without an interval
    # numeric interval columns win over the printed one; an h0 names the expectation
    row = {"artifact": "table2", "claim": "the IN2 baseline loses on NQ-Open", "ci_low": -5.7, "ci_high": -0.7,
           "ci": "[-6, -1]", "h0": paper.h0_text("decrease"), "verdict": "holds"}
    assert paper.claim_interval(row) == (-5.7, -0.7) and paper.claim_expectation(row) == "decrease"
    assert paper.parse_published(float("nan")) == {}
    assert paper.published_deltas("triviaqa", "IN2") == "Mistral-7B-Instruct-v0.1: -2.19"


def test_claims_figure_heads_the_index_and_the_readme_map(tmp_path):
    """results/<profile>/claims.png is written from the recorded claims (claims.csv, else the manifest's facts),
    heads index.html, which shows each notebook's main figure linked to its report, and is linked at the top of
    the README's map block by `kvlib map --update` without running any model."""
    import csv
    import json

    out = tmp_path / "results" / "p"
    (out / "05_general_benchmarks").mkdir(parents=True)
    (out / "03_mdqa").mkdir()
    rows = _claims_csv_rows()
    with (out / "05_general_benchmarks" / "claims.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows[:1] + rows[3:4])
    (out / "03_mdqa" / "mdqa_by_position.png").write_bytes(b"png")
    manifest = {"profile": "p", "notebooks": {
        "05_general_benchmarks": {"status": "ok", "outputs": ["05_general_benchmarks/claims.csv"]},
        "03_mdqa": {"status": "ok", "outputs": ["03_mdqa/claims.csv", "03_mdqa/mdqa_by_position.png",
                                                "03_mdqa/z.png"],
                    "facts": {"claims": [{"artifact": "fig5", "claim": "improves MDQA", "model": "ft",
                                          "verdict": "holds"}]}},
        "04_flenqa": {"status": "failed", "outputs": []}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert [c["artifact"] for c in repro_map.profile_claims(out, manifest["notebooks"])] == ["fig5", "table1",
                                                                                           "table1"]
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "03_mdqa.ipynb").write_text("{}")
    readme = tmp_path / "README.md"
    readme.write_text(f"{repro_map.MAP_START.format(profile='p')}\n{repro_map.MAP_END.format(profile='p')}\n")
    repro_map.update_readme_map(readme, "p", tmp_path / "results", tmp_path / "params", tmp_path / "notebooks")
    assert (out / "claims.png").read_bytes().startswith(b"\x89PNG")
    block = readme.read_text().split("\n", 1)[1]
    assert block.startswith("[![The p profile's claims") and "](results/p/claims.png)" in block.split("\n")[0]
    page = (out / "index.html").read_text()
    assert page.index('<img src="claims.png"') < page.index("<h2>Reports</h2>") < page.index("<h2>Environment</h2>")
    assert '<a href="03_mdqa.html"><img src="03_mdqa/mdqa_by_position.png"' in page  # the artifact's figure
    assert '<a href="05_general_benchmarks.html">05_general_benchmarks</a>' in page and "04_flenqa.html" not in page
    assert repro_map.main_figure("07_kv_retrieval", {"outputs": ["07_kv_retrieval/b.png", "07_kv_retrieval/a.csv"]}
                                 ) == "07_kv_retrieval/b.png"
    # no claim recorded: no figure, and none left behind
    manifest["notebooks"] = {"01_synthetic_data": {"status": "ok", "outputs": []}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert repro_map.write_claims_figure(out) is None and not (out / "claims.png").exists()
