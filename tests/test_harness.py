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


def test_the_harness_runs_its_default_path_unless_a_task_asks_for_the_chat_template():
    """The cross-check runs lm-eval without apply_chat_template wherever kvlib sends raw text (the default for
    every task), so it can disagree with kvlib; only a task asking for prompt_format chat gets the template."""
    assert not any(harness.uses_chat_template(_prepared(name, max_examples=1)) for name in harness.HARNESS_FILES)
    assert harness.uses_chat_template(_prepared("triviaqa", max_examples=1, prompt_format="chat"))
    assert not harness.uses_chat_template(_prepared("mmlu", max_examples=1))  # log-likelihood: raw text


@pytest.mark.slow
def test_harness_agrees_with_kvlib_item_by_item(hf_backend, tmp_path):
    """Same model (embedded, float32), same items, both on the harness's default path (raw text, no chat
    template): the harness chooses the same options and generates the same text as kvlib on MMLU, HellaSwag and
    GSM8K. On TriviaQA and NQ-Open the scores agree, and so do the predictions except for the one known
    difference the cross-check exists to show: a reply that starts with the stop string "\n" is the harness's
    empty answer, while kvlib's backends strip the reply before cutting it (2 of these 4 items, measured)."""
    tasks = [_prepared("mmlu", max_examples=2), _prepared("hellaswag", max_examples=2),
             _prepared("gsm8k", max_examples=1, max_new_tokens=48), _prepared("triviaqa", max_examples=2),
             _prepared("nq_open", max_examples=2)]
    rows = [r for t in tasks for r in general.evaluate_task(hf_backend, t, "original")]
    assert {r["prompt_format"] for r in rows} == {"raw"}
    harness_rows = harness.run_harness(hf_backend.model, hf_backend.tokenizer, tasks, tmp_path, batch_size=3)
    assert not any(h["chat_template"] for h in harness_rows)
    table = {(r["task"], r["metric"]): r for r in harness.compare(rows, harness_rows, "original")}
    assert set(table) == {("mmlu", "acc"), ("hellaswag", "acc"), ("hellaswag", "acc_norm"), ("gsm8k", "exact_strict"),
                          ("gsm8k", "exact_flexible"), ("triviaqa", "em"), ("nq_open", "em")}
    for key, row in table.items():
        assert row["n"] == len(tasks[[t.spec.name for t in tasks].index(key[0])].items)
        assert row["prompt_format"] == "raw" and row["harness_chat_template"] is False
        assert row["same_score"] == 1.0, row
        if key[0] not in ("triviaqa", "nq_open"):
            assert row["same_prediction"] == 1.0, row
    answers = {(r["task"], r["id"]): r["answer"] for r in rows}
    for h in harness_rows:
        if h["task"] in ("triviaqa", "nq_open") and h["harness_prediction"] != answers[(h["task"], h["id"])]:
            assert h["harness_prediction"] == "", h  # the reply began with "\n": the harness cut it there
