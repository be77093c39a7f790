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


def test_cpu_record_derives_the_reasons_from_the_item_rows(at_root):
    record = json.loads((ROOT / "results" / "cpu" / rejudge.RECORD_FILE).read_text(encoding="utf-8"))["notebooks"]
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


def test_map_shows_reasons_and_rejudged_verdicts(at_root):
    rows = {r["artifact"].split(":")[0]: r["verdict"] for r in repro_map.reproduction_map("cpu")}
    assert "evaluated in bfloat16" in rows["Fig. 5"] and "now float32" in rows["Fig. 5"]
    assert "re-judged from the committed items: untestable at this model's level" in rows["Figs. 6-7"]
    assert "(was: inconclusive at this n" in rows["Figs. 6-7"]
    assert "71e4e198fb" in rows["Table 2"] and "19 of 19 claims to be re-run" in rows["Table 2"]
    assert "chat template" in rows["Table 1"]
    # Table 1's old "partly holds" stood on collapsed GSM8K intervals: never shown without the re-judging mark
    table1 = rows["Table 1"]
    assert table1.startswith("stale (") and "re-judged from the committed items" in table1
    assert "(was: partly holds" in table1 and "on a zero-width interval" in table1 and "claims to be re-run" in table1
    assert "not tested: the finetune did not learn its task" in rows["Fig. 9"]


def test_a_changed_item_file_drops_its_notebook_from_the_record(tmp_path):
    results = tmp_path / "results" / "cpu"
    shutil.copytree(ROOT / "results" / "cpu" / "08_longer_context", results / "08_longer_context")
    shutil.copy(ROOT / "results" / "cpu" / rejudge.RECORD_FILE, results / rejudge.RECORD_FILE)
    assert "08_longer_context" in rejudge.load_record(results)
    items = results / "08_longer_context" / "mdqa_items.csv"
    items.write_text(items.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert "08_longer_context" not in rejudge.load_record(results)
    assert rejudge.load_record(tmp_path) == {}  # no record: nothing to show


def test_claims_figure_draws_rejudged_claims_and_marks_the_rest(at_root):
    entries = load_manifest_entries(ROOT / "results" / "cpu")
    record = rejudge.load_record(ROOT / "results" / "cpu")
    claims = repro_map.profile_claims(ROOT / "results" / "cpu", entries, record)
    gsm8k = [c for c in claims if c["artifact"] == "table1" and c["claim"].endswith("on GSM8K")]
    assert gsm8k and all(c["verdict"] == rejudge.STALE_RERUN for c in gsm8k)
    flenqa = [c for c in claims if c["artifact"] == "fig6_7"]
    assert flenqa and all(c["verdict"].startswith("untestable at this model's level") for c in flenqa)
    notes = repro_map.figure_notes({}, record)
    assert notes["table1"].startswith("stale: re-judged from the committed items") and "to be re-run" in notes["table1"]
    assert notes["table2"] == "stale: 19 claims to be re-run"
