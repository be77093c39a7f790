"""The benchmarks' README sections (benchmarks/readme_section.py, bench_eval's summary): written between their
markers by the run itself, refused before measuring when the markers are missing, ratios computed against the
baseline configuration. No timing is measured here (speed lives in benchmarks/, not in tests)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_eval  # noqa: E402
import bench_train  # noqa: E402
import bf16_option  # noqa: E402
import readme_section  # noqa: E402


def test_the_readme_has_a_section_for_every_benchmark():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for bench in sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py")):
        start, end = readme_section.markers(bench)
        assert start in text and end in text, f"README.md lacks the {bench} section markers"
        source = (REPO / "benchmarks" / f"{bench}.py").read_text(encoding="utf-8")
        assert "add_update_option(parser)" in source and f'write(args.update, "{bench}"' in source


def test_write_replaces_only_the_section(tmp_path):
    readme = tmp_path / "README.md"
    start, end = readme_section.markers("bench_x")
    readme.write_text(f"# title\n\n{start}\nold\n{end}\n\ntail\n", encoding="utf-8")
    readme_section.write(str(readme), "bench_x", readme_section.text_block(["a  1.00x", "b  2.00x"]))
    assert readme.read_text(encoding="utf-8") == (f"# title\n\n{start}\n```text\na  1.00x\nb  2.00x\n```\n{end}\n\n"
                                                  "tail\n")
    readme_section.write(None, "bench_x", "ignored")  # no --update: nothing written
    assert "ignored" not in readme.read_text(encoding="utf-8")


def test_check_refuses_before_measuring(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        readme_section.check(parser, str(readme), "bench_x")
    with pytest.raises(SystemExit):
        readme_section.check(parser, str(tmp_path / "missing.md"), "bench_x")
    readme_section.check(parser, None, "bench_x")  # no --update: nothing to check


def test_bench_eval_summary_ratios_and_agreement():
    labels = [c[0] for c in bench_eval.CONFIGS]
    answers = ["a", "b", "c", "d"]
    results = {}
    for i, (label, dtype, *_) in enumerate(bench_eval.CONFIGS):
        seconds = 40.0 / (1 + i)  # each lever faster than the one above
        got = list(answers) if dtype == "float32" else ["a", "b", "c", "x"]  # bf16 differs on one answer
        results[label] = {"seconds": seconds, "cpu_s": seconds * 2, "answers": got, "prefill_s": 0.0,
                          "decode_s": 0.3, "decode_rows": 10}
    rows, goals = bench_eval.summarize(results, len(answers))
    assert [r["configuration"] for r in rows] == labels
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[3]["speedup"] == pytest.approx(4.0)  # all float32 levers: 40 s -> 10 s
    bf16 = next(r for r in rows if r["dtype"] == "bfloat16")
    assert bf16["same"] == 3  # compared with float32's answers
    assert any("4.00x" in g and "4/4 answers identical" in g for g in goals)
    assert any("75% of answers equal to float32's" in g for g in goals)
    table = bench_eval.markdown("setup line", rows, len(answers), goals)
    assert table.startswith("setup line\n\n| configuration |") and "| 4.00x |" in table and "| 3/4 |" in table


def test_one_bf16_switch_decides_what_each_benchmark_times(monkeypatch):
    monkeypatch.setattr(bf16_option.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bf16_option, "cpu_supports_bf16", lambda: False)
    assert bf16_option.bf16_timed("yes") == (True, None)
    timed, why = bf16_option.bf16_timed("auto")
    assert not timed and "no native bf16" in why and "--bf16 yes times it anyway" in why
    assert bf16_option.bf16_timed("no") == (False, "bf16 not timed (--bf16 no; --bf16 yes times it anyway)")
    monkeypatch.setattr(bf16_option, "cpu_supports_bf16", lambda: True)
    assert bf16_option.bf16_timed("auto") == (True, None)
    assert bf16_option.bf16_timed("no")[0] is False
    parser = argparse.ArgumentParser()
    bf16_option.add_bf16_option(parser)
    assert parser.parse_args([]).bf16 == "auto"
    assert all(bench.bf16_timed is bf16_option.bf16_timed for bench in (bench_eval, bench_train))
