"""The record of what the committed results say under the current protocol (results/<profile>/rejudged.json,
kvlib.pipeline.rejudge.build_record) and how the reproduction map, index page and claims figure show it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvlib.engine.io import dumps_json
from kvlib.pipeline import rejudge, repro_map
from kvlib.pipeline.manifest import load_manifest_entries

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.parent.name for p in (ROOT / "results").glob(f"*/{rejudge.RECORD_FILE}"))


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    return ROOT


def test_cpu_has_a_record():
    assert "cpu" in PROFILES


@pytest.mark.parametrize("profile", PROFILES)
def test_committed_record_is_regenerated_from_the_committed_items(at_root, profile):
    """Fails when a committed record is out of date: run `kvlib rejudge --profile P --write`, then `kvlib map`."""
    committed = json.loads((ROOT / "results" / profile / rejudge.RECORD_FILE).read_text(encoding="utf-8"))
    assert json.loads(dumps_json(rejudge.build_record(profile))) == committed, (
        f"results/{profile}/{rejudge.RECORD_FILE} is out of date: run `kvlib rejudge --profile {profile} --write` "
        f"and `kvlib map --profile {profile} --update README.md`")
    assert set(rejudge.load_record(ROOT / "results" / profile)) == set(committed["notebooks"])


def test_cpu_record_derives_the_reasons_from_the_item_rows(at_root, legacy_results):
    record = json.loads((legacy_results / "cpu" / rejudge.RECORD_FILE).read_text(encoding="utf-8"))["notebooks"]
    changes = {name: {s["change"] for s in rec["stale"]} for name, rec in record.items()}
    assert changes["03_mdqa"] == changes["04_flenqa"] == changes["08_longer_context"] == {"numerics"}
    assert changes["05_general_benchmarks"] == {"numerics", "chat_template"}
    assert changes["06_baselines"] == {"evaluated_weights", "chat_template"}  # 06 ran in float32
    assert "71e4e198fb" in next(s["reason"] for s in record["06_baselines"]["stale"] if s["change"] == "evaluated_weights")
    # every claim on the stale 06 model, and every generative-benchmark claim, is left to the re-run
    for c in record["06_baselines"]["claims"]:
        assert ("rerun" in c) == (c["model"] == "finetuned (template)" or any(
            t in c["claim"] for t in ("GSM8K", "TriviaQA", "NQ-Open")))
    # no verdict that stood on a zero-width interval is carried over: it is re-judged or left to the re-run
    collapsed = [c for rec in record.values() for c in rec["claims"] if c["old_ci_zero_width"]]
    assert collapsed and all("rerun" in c or not rejudge._zero_width(c["new_ci"]) for c in collapsed)
    gsm8k = [c for c in record["05_general_benchmarks"]["claims"] if c["claim"].endswith("on GSM8K")]
    assert gsm8k and all("rerun" in c and "chat template" in c["rerun"] for c in gsm8k)


def test_map_shows_reasons_and_rejudged_verdicts(at_root, legacy_results):
    rows = {r["artifact"].split(":")[0]: r["verdict"] for r in repro_map.reproduction_map("cpu", legacy_results)}
    assert "evaluated in bfloat16" in rows["Fig. 5"] and "now float32" in rows["Fig. 5"]
    # the multi-subkey finetune scored 32.5% on its own held-out task: not tested; the others stand at chance
    assert "re-judged from the committed items: not tested: the finetune did not learn its task (2 not tested" in rows["Figs. 6-7"]
    assert "4 untestable at this model's level" in rows["Figs. 6-7"]
    assert "(was: inconclusive at this n" in rows["Figs. 6-7"]
    assert "71e4e198fb" in rows["Table 2"] and "19 of 19 claims to be re-run" in rows["Table 2"]
    assert "chat template" in rows["Table 1"]
    # Table 1's old "partly holds" stood on collapsed GSM8K intervals: never shown without the re-judging mark
    table1 = rows["Table 1"]
    assert table1.startswith("stale (") and "re-judged from the committed items" in table1
    assert "(was: partly holds" in table1 and "on a zero-width interval" in table1 and "claims to be re-run" in table1
    assert "not tested: the finetune did not learn its task" in rows["Fig. 9"]
    # ... with the held-out accuracy the finetune measured, which the count alone would hide
    assert "; not tested: finetuned (long) (held-out value accuracy " in rows["Fig. 9"]
    assert "finetuned (multi-subkey) (held-out value accuracy 32.5% of" in rows["Figs. 6-7"]


def test_not_tested_note_names_each_finetune_with_its_measured_accuracy():
    from kvlib.report.paper import NOT_TESTED
    why = "held-out value accuracy 0.0% of 40 < 50%"
    claims = [{"model": "long", "verdict": f"{NOT_TESTED} ({why})"},
              {"model": "long", "verdict": f"{NOT_TESTED} ({why})"},  # one finetune, two claims: named once
              {"model": "other", "verdict": f"{NOT_TESTED} (held-out value accuracy 10.0% of 20 < 50%)"},
              {"model": "ft", "verdict": "holds"}]
    assert repro_map.not_tested_note(claims) == (
        f"not tested: long ({why}), other (held-out value accuracy 10.0% of 20 < 50%)")
    # every claim tested, or a not-tested verdict without a reason: nothing to add
    assert repro_map.not_tested_note([{"model": "ft", "verdict": "holds"}]) == ""
    assert repro_map.not_tested_note([{"model": "ft", "verdict": NOT_TESTED}]) == ""
    assert repro_map.not_tested_note([]) == ""


def test_a_changed_item_file_drops_its_notebook_from_the_record(tmp_path, legacy_results):
    results = tmp_path / "results" / "cpu"
    shutil.copytree(legacy_results / "cpu" / "08_longer_context", results / "08_longer_context")
    shutil.copy(legacy_results / "cpu" / rejudge.RECORD_FILE, results / rejudge.RECORD_FILE)
    assert "08_longer_context" in rejudge.load_record(results)
    items = results / "08_longer_context" / "mdqa_items.csv"
    items.write_text(items.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert "08_longer_context" not in rejudge.load_record(results)
    assert rejudge.load_record(tmp_path) == {}  # no record: nothing to show


def test_claims_figure_draws_rejudged_claims_and_marks_the_rest(at_root, legacy_results):
    entries = load_manifest_entries(legacy_results / "cpu")
    record = rejudge.load_record(legacy_results / "cpu")
    claims = repro_map.profile_claims(legacy_results / "cpu", entries, record)
    gsm8k = [c for c in claims if c["artifact"] == "table1" and c["claim"].endswith("on GSM8K")]
    assert gsm8k and all(c["verdict"] == rejudge.STALE_RERUN for c in gsm8k)
    flenqa = [c for c in claims if c["artifact"] == "fig6_7"]
    assert flenqa and all(c["verdict"].startswith("not tested: the finetune did not learn its task (held-out value "
                                                  "accuracy 32.5% of 40") if c["model"] == "finetuned (multi-subkey)"
                          else c["verdict"].startswith("untestable at this model's level") for c in flenqa)
    notes = repro_map.figure_notes({}, record)
    assert notes["table1"].startswith("stale: re-judged from the committed items") and "to be re-run" in notes["table1"]
    assert notes["table2"] == "stale: 19 claims to be re-run"


@pytest.mark.parametrize("notebook", sorted(rejudge.ITEM_FILES))
def test_rejudging_current_results_gives_the_notebooks_own_claims(at_root, notebook):
    """The quick profile's results are rendered by the current code, its learned gate left its finetunes out (they
    did not learn their task): re-judged from the committed items, every claim comes back as the notebook judged it,
    the not-tested ones included (kvlib.pipeline.runs.committed_gate)."""
    results = ROOT / "results" / "quick"
    old = rejudge._old_claims(results / notebook, load_manifest_entries(results)[notebook])
    new = rejudge.rejudge_claims(notebook, results)
    assert old and len(new) == len(old)
    for row in rejudge.compare_claims(old, new):
        assert (row["new_verdict"], row["new_ci"]) == (row["old_verdict"], row["old_ci"]), row
    if notebook != "02_finetune":
        assert any(r["verdict"].startswith("not tested") for r in new)


def test_committed_gate_reads_the_table_a_notebook_wrote(tmp_path):
    from kvlib.pipeline.runs import LEARNED_TABLE, committed_gate

    models = {"original": {}, "ft0": {"run": "a"}, "ft1": {"run": "b"}, "ft2": {"run": "c"}}
    assert committed_gate(tmp_path, models, {}).checks == {}  # no table: every model was evaluated
    table = tmp_path / f"{LEARNED_TABLE}.csv"
    table.write_text("model,run,n,value,ci_low,ci_high,threshold,learned,reason\n"
                     "ft0,a,8,0.75,0.4,0.9,0.5,True,\n"
                     "ft1,b,8,0.25,0.07,0.59,0.5,False,held-out value accuracy 25.0% of 8 < 50%\n"
                     "ft2,c,0,,,,0.5,False,not trained: no sweep trial learned its task\n", encoding="utf-8")
    gate = committed_gate(tmp_path, models, {"ft": ["ft0", "ft1"]})
    assert gate.failed == {"ft1": "held-out value accuracy 25.0% of 8 < 50%",
                           "ft2": "not trained: no sweep trial learned its task"}
    assert gate.checks["ft2"]["value"] is None and gate.checks["ft0"]["learned"] is True
    assert gate.learned_seed_groups == {} and set(gate.reasons()) == {"ft", "ft2"}
    assert gate.files == [table]
    table.write_text(table.read_text(encoding="utf-8").replace("True", "yes"), encoding="utf-8")
    with pytest.raises(ValueError, match="learned must be True or False, not 'yes'"):
        committed_gate(tmp_path, models, {})


def test_the_held_out_check_of_02_is_a_record_of_the_weights_a_run_has_now():
    """02's held-out items name each finetuned row's run: when 02 finished last, its weights are the run's current
    ones, and an evaluation notebook that evaluated an earlier training (the only one evaluating that run, so no
    other notebook could show it) is found stale; when an evaluation finished later on other weights, 02 is."""
    heldout = [{"model": "original", "run": "short", "weights_sha256": "gguf"},
               {"model": "finetuned", "run": "short", "weights_sha256": "b" * 64},
               {"model": "finetuned", "run": "long", "weights_sha256": "c" * 64}]
    evaluation = [{"model": "ft (short)", "weights_sha256": "a" * 64}, {"model": "original", "weights_sha256": "gguf"}]
    entries = {"02_finetune": {"finished": "2026-02-02T00:00:00"},
               "06_baselines": {"finished": "2026-01-01T00:00:00",
                                "params": {"models": {"ft (short)": {"run": "short"}, "original": {"model": "x"}}}}}
    items = {"02_finetune": {"heldout_items.csv": heldout}, "06_baselines": {"items.csv": evaluation}}
    current = rejudge.current_run_weights(Path("."), entries, items)
    assert current == {"short": ("b" * 64, "02_finetune"), "long": ("c" * 64, "02_finetune")}
    [found] = rejudge.protocol_findings("06_baselines", entries["06_baselines"], items["06_baselines"], current)
    assert found["change"] == "evaluated_weights" and found["models"] == ["ft (short)"]
    assert found["reason"].startswith(f"'ft (short)' (run short) evaluated weights {'a' * 10}, not {'b' * 10} as 02_finetune")
    assert rejudge.protocol_findings("02_finetune", entries["02_finetune"], items["02_finetune"], current) == []

    entries["06_baselines"]["finished"] = "2026-03-03T00:00:00"  # the evaluation ran after 02, on other weights
    current = rejudge.current_run_weights(Path("."), entries, items)
    assert current["short"] == ("a" * 64, "06_baselines") and current["long"] == ("c" * 64, "02_finetune")
    [found] = rejudge.protocol_findings("02_finetune", entries["02_finetune"], items["02_finetune"], current)
    assert found["models"] == ["finetuned"] and "(run short)" in found["reason"]
    # a notebook other than 02 with a `run` column and a "finetuned" label maps nothing by it
    assert rejudge.current_run_weights(Path("."), {"07_kv_retrieval": {}}, {"07_kv_retrieval": {"x": heldout}}) == {}
