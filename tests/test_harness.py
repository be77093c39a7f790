"""kvlib.tasks.harness: kvlib's general-benchmark items through lm-evaluation-harness itself (make test installs it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from kvlib.tasks import general
from kvlib.tasks import harness

pytest.importorskip("lm_eval", reason='lm-evaluation-harness is not installed (pip install -e ".[harness]")')


def _prepared(name: str, **settings):
    try:
        return general.prepare_task(name, settings, seed=0)
    except FileNotFoundError as exc:
        pytest.skip(f"{name} data absent: {exc}")


def test_hellaswag_documents_give_kvlib_query_through_the_harness_preprocessing():
    """The harness rebuilds each query with its own process_docs from the documents kvlib writes."""
    import datasets

    path = harness.harness_tasks_dir() / "hellaswag" / "utils.py"
    spec = importlib.util.spec_from_file_location("harness_hellaswag_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    task = _prepared("hellaswag", max_examples=30)
    docs = utils.process_docs(datasets.Dataset.from_list([harness.harness_doc("hellaswag", i) for i in task.items]))
    for item, doc in zip(task.items, docs):
        assert doc["query"] == item.question
        assert doc["choices"] == list(item.choices)
        assert doc["gold"] == item.gold


def test_task_files_include_the_harness_definitions_and_hold_the_items(tmp_path):
    tasks = [_prepared("mmlu", max_examples=3), _prepared("triviaqa", max_examples=2)]
    names = harness.write_harness_tasks(tasks, tmp_path)
    assert len(names["mmlu"]) == len({i.group for i in tasks[0].items}) and names["triviaqa"] == ["kvlib_triviaqa"]
    config = yaml.safe_load((tmp_path / "kvlib_triviaqa.yaml").read_text())
    assert Path(config["include"]).is_file() and config["dataset_path"] == "json"
    assert config["generation_kwargs"]["max_gen_toks"] == tasks[1].max_new_tokens
    assert config["generation_kwargs"]["until"] == ["\n", ".", ","]  # the harness's own stop strings kept
    rows = Path(config["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()
    assert len(rows) == 2
    subject = names["mmlu"][0]
    mmlu = yaml.safe_load((tmp_path / f"{subject}.yaml").read_text())
    assert mmlu["fewshot_split"] == "dev" and mmlu["num_fewshot"] == 5  # the harness's default template says 0
    assert len(Path(mmlu["dataset_kwargs"]["data_files"]["dev"]).read_text().splitlines()) == 5


def test_unsupported_shot_count_is_refused(tmp_path):
    task = _prepared("mmlu", max_examples=1, n_shot=2)
    with pytest.raises(ValueError, match="shots"):
        harness.write_harness_tasks([task], tmp_path)


@pytest.mark.slow
def test_harness_agrees_with_kvlib_item_by_item(hf_backend, tmp_path):
    """Same model (embedded, float32), same items: the harness chooses the same options and generates the
    same text as kvlib on MMLU, HellaSwag, GSM8K and TriviaQA. NQ-Open differs by design (the harness sends
    its description as a system message), so only its plumbing is checked."""
    tasks = [_prepared("mmlu", max_examples=2), _prepared("hellaswag", max_examples=2),
             _prepared("gsm8k", max_examples=1, max_new_tokens=48), _prepared("triviaqa", max_examples=2),
             _prepared("nq_open", max_examples=2)]
    rows = [r for t in tasks for r in general.evaluate_task(hf_backend, t, "original")]
    harness_rows = harness.run_harness(hf_backend.model, hf_backend.tokenizer, tasks, tmp_path, batch_size=3)
    table = {(r["task"], r["metric"]): r for r in harness.compare(rows, harness_rows, "original")}
    assert set(table) == {("mmlu", "acc"), ("hellaswag", "acc"), ("hellaswag", "acc_norm"), ("gsm8k", "exact_strict"),
                          ("gsm8k", "exact_flexible"), ("triviaqa", "em"), ("nq_open", "em")}
    for key, row in table.items():
        assert row["n"] == len(tasks[[t.spec.name for t in tasks].index(key[0])].items)
        if key[0] != "nq_open":
            assert row["same_prediction"] == 1.0 and row["same_score"] == 1.0, row
