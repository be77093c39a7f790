"""Cross-check of kvlib's general benchmarks against lm-evaluation-harness itself (optional: `pip install
-e ".[harness]"`).

kvlib re-implements the harness's task definitions (kvlib.tasks.general); this module runs the SAME items through
the real harness so a user can compare the two engines item by item. Offline: each prepared task's items
are written as local JSONL in the schema the harness's own task expects (`harness_docs`), and a task YAML
`include`s the harness's installed definition (prompt, few-shot setup, filters, metric), overriding only
where the documents come from (`dataset_path: json`). The harness then scores the model kvlib already
loaded (same weights, same dtype).

Prompt format: the harness runs on its own default path, without `apply_chat_template`, for every task kvlib
runs as raw text on a local model: the log-likelihood tasks (MMLU, HellaSwag) and, by default, the generation
tasks (TriviaQA, NQ-Open, GSM8K; kvlib.tasks.general.resolve_prompt_format). So the two engines are compared on
the path a harness user gets, and where kvlib's prompts, tokenization or reply cutting differ from it, the
cross-check disagrees. Only a task whose params ask for the chat template (`prompt_format: chat`) goes through
the harness's `apply_chat_template=True` (few-shot examples as turns with `fewshot_format: multiturn`); there the
harness sends a task's `description` (NQ-Open's "Answer these questions:") as a system message, while kvlib puts
it at the start of the first user turn, so NQ-Open predictions can differ on that path by design. On the raw
path one known difference is counted, not hidden: a reply that starts with a stop string ("\nParis") is the
harness's empty answer, while kvlib's backends strip the reply before cutting it (kvlib.tasks.general).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from kvlib.engine.scoring import multiple_choice_scores
from kvlib.tasks.general import PreparedTask, resolve_prompt_format

# kvlib task -> the harness task definition it follows (relative to lm_eval/tasks)
HARNESS_FILES = {
    "mmlu": "mmlu/default/mmlu_{subject}.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "gsm8k": "gsm8k/gsm8k-cot.yaml",
    "triviaqa": "triviaqa/default.yaml",
    "nq_open": "nq_open/nq_open.yaml",
}
# kvlib metric -> (harness metric, harness filter) compared item by item
COMPARED = {
    "mmlu": [("acc", "acc", "none")],
    "hellaswag": [("acc", "acc", "none"), ("acc_norm", "acc_norm", "none")],
    "gsm8k": [("exact_strict", "exact_match", "strict-match"), ("exact_flexible", "exact_match", "flexible-extract")],
    "triviaqa": [("em", "exact_match", "remove_whitespace")],
    "nq_open": [("em", "exact_match", "remove_whitespace")],
}
LOGLIKELIHOOD_TASKS = ("mmlu", "hellaswag")


def uses_chat_template(task: PreparedTask) -> bool:
    """Whether the harness runs `task` with apply_chat_template: only a generation task that kvlib runs through
    the chat template on a local model (its params ask for `prompt_format: chat`); everything else goes the
    harness's default way, raw text."""
    return task.spec.name not in LOGLIKELIHOOD_TASKS and resolve_prompt_format(task, raw_text=True) == "chat"


def available() -> bool:
    """Whether lm-evaluation-harness is installed."""

    return importlib.util.find_spec("lm_eval") is not None


def harness_tasks_dir() -> Path:

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ImportError('lm-evaluation-harness is not installed: pip install -e ".[harness]"')
    return Path(spec.origin).parent / "tasks"


def harness_doc(task: str, item) -> dict:
    """One kvlib Item in the document schema of the harness's task (plus `kvlib_id` to match results)."""
    if task == "mmlu":
        return {"question": item.question, "choices": list(item.choices), "answer": item.gold, "kvlib_id": item.id}
    if task == "hellaswag":
        # the harness builds its query as preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize());
        # kvlib's item already holds that query, so it goes in as activity_label + ctx_a (ctx_b empty)
        label, sep, body = item.question.partition(": ")
        if not sep:
            raise ValueError(f"hellaswag item {item.id}: expected 'activity: context', got {item.question[:60]!r}")
        return {"activity_label": label, "ctx_a": body, "ctx_b": "", "endings": list(item.choices),
                "label": str(item.gold), "kvlib_id": item.id}
    if task == "gsm8k":
        return {"question": item.question, "answer": f"#### {item.answers[0]}", "kvlib_id": item.id}
    if task == "triviaqa":
        return {"question": item.question, "answer": {"aliases": list(item.answers)}, "kvlib_id": item.id}
    if task == "nq_open":
        return {"question": item.question, "answer": list(item.answers), "kvlib_id": item.id}
    raise ValueError(f"no harness cross-check for task {task!r}; known: {', '.join(HARNESS_FILES)}")


def _dump(path: Path, docs: Sequence[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return str(path.resolve())


def write_harness_tasks(tasks: Sequence[PreparedTask], out_dir: str | Path) -> dict[str, list[str]]:
    """Write each task's items (MMLU: per subject, with its dev split for the 5 shots) as JSONL and one
    harness task YAML per file under `out_dir`. Returns kvlib task -> harness task names."""

    root = harness_tasks_dir()
    out = Path(out_dir)
    names: dict[str, list[str]] = {}
    for task in tasks:
        name = task.spec.name
        if name not in HARNESS_FILES:
            raise ValueError(f"no harness cross-check for task {name!r}")
        if task.n_shot != task.spec.n_shot:
            raise ValueError(f"{name}: the cross-check uses the harness's {task.spec.n_shot} shots, got {task.n_shot}")
        groups = sorted({i.group for i in task.items}) if name == "mmlu" else [""]
        for group in groups:
            items = [i for i in task.items if i.group == group]
            harness_name = f"kvlib_{name}" + (f"_{group}" if group else "")
            files = {"test": _dump(out / f"{harness_name}.test.jsonl", [harness_doc(name, i) for i in items])}
            config: dict[str, Any] = {
                "include": str(root / HARNESS_FILES[name].format(subject=group)),
                "task": harness_name, "tag": "kvlib_crosscheck",
                "dataset_path": "json", "dataset_name": None,
                "training_split": None, "validation_split": None, "test_split": "test",
                # the harness's MMLU definition leaves the shot count to the command line (--num_fewshot 5)
                "num_fewshot": task.n_shot,
            }
            if task.spec.variants == ("generate",):
                # the harness's stop strings, with kvlib's generation budget (the harness's default is 256)
                included = yaml.safe_load(Path(config["include"]).read_text(encoding="utf-8"))
                config["generation_kwargs"] = {**included.get("generation_kwargs", {}),
                                               "max_gen_toks": task.max_new_tokens}
            if name == "mmlu":  # few-shot: the harness's first_n sampler over the subject's dev split, as kvlib
                dev = [harness_doc(name, s) for s in task.shots_for(items[0])]
                files["dev"] = _dump(out / f"{harness_name}.dev.jsonl", dev)
                config["fewshot_split"] = "dev"
            config["dataset_kwargs"] = {"data_files": files}
            (out / f"{harness_name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            names.setdefault(name, []).append(harness_name)
    return names


def run_harness(model: Any, tokenizer: Any, tasks: Sequence[PreparedTask], work_dir: str | Path,
                batch_size: int = 8, fewshot_format: str = "multiturn") -> list[dict]:
    """Evaluate an already-loaded HF model with lm-evaluation-harness on kvlib's prepared items. One row per
    (task, item id, kvlib metric) with the harness's per-item score, matched through `kvlib_id`. The harness runs
    on its default path (no chat template) except for tasks kvlib runs through the chat template
    (`uses_chat_template`), which get `apply_chat_template=True` (and `fewshot_as_multiturn` by `fewshot_format`).
    Each row says which (`chat_template`)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = write_harness_tasks(tasks, work_dir)
    manager = TaskManager(include_path=str(Path(work_dir).resolve()), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=_context(model))
    chat_tasks = {t.spec.name for t in tasks if uses_chat_template(t)}
    rows = []
    for chat, wanted in ((False, [n for n in names if n not in chat_tasks]),
                         (True, [n for n in names if n in chat_tasks])):
        if not wanted:
            continue
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[h for n in wanted for h in names[n]], task_manager=manager, log_samples=True,
            apply_chat_template=chat, fewshot_as_multiturn=chat and fewshot_format == "multiturn", bootstrap_iters=0, random_seed=0,
            numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        for name in wanted:
            for harness_name in names[name]:
                for sample in results["samples"][harness_name]:
                    for kvlib_metric, metric, filter_name in COMPARED[name]:
                        if sample.get("filter", "none") != filter_name:
                            continue
                        rows.append({"task": name, "id": sample["doc"]["kvlib_id"], "metric": kvlib_metric,
                                     "chat_template": chat, "harness": float(sample[metric]),
                                     "harness_prediction": _prediction(sample, metric)})
    return rows


def _context(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _prediction(sample: dict, metric: str) -> int | str:
    """What the harness chose: the choice index by kvlib's own multiple-choice rule over the harness's
    log-likelihoods (acc: highest; acc_norm: highest per character of the choice, as the harness normalises),
    or the raw generated text up to its stop strings."""
    if sample.get("filter", "none") == "none" and metric in ("acc", "acc_norm"):
        doc = sample["doc"]
        choices = doc.get("endings") or doc.get("choices")  # HellaSwag endings, MMLU option texts
        gold = int(doc["label"]) if "label" in doc else int(doc["answer"])
        scores = multiple_choice_scores([float(r[0]) for r in sample["filtered_resps"]], choices, gold)
        return scores["pred_norm" if metric == "acc_norm" else "pred"]
    return str(sample["resps"][0][0]).strip()


def compare(kvlib_rows: Sequence[dict], harness_rows: Sequence[dict], model: str) -> list[dict]:
    """Per task and metric: n items both engines scored, kvlib's mean, the harness's mean, the share of items
    whose score agrees, and the share where both engines made the same prediction (the same choice; for
    generation the same text up to the stop strings). `prompt_format`: the format of kvlib's rows (raw text
    or chat template), `harness_chat_template`: whether the harness applied one. kvlib_rows:
    kvlib.tasks.general.evaluate_task rows."""
    ours = {(r["task"], r["id"]): r for r in kvlib_rows if r["model"] == model and r["skipped"] is None}
    table: dict[tuple[str, str], list[tuple[float, float, bool]]] = {}
    formats: dict[tuple[str, str], tuple] = {}
    for h in harness_rows:
        mine = ours.get((h["task"], h["id"]))
        if mine is None or h["metric"] not in mine:
            continue
        if isinstance(h["harness_prediction"], str):  # generation: the reply up to the stop strings
            predicted = mine.get("answer")
        else:  # multiple choice: the chosen index
            predicted = mine.get("pred_norm" if h["metric"] == "acc_norm" else "pred")
        same = predicted == h["harness_prediction"]
        table.setdefault((h["task"], h["metric"]), []).append((float(mine[h["metric"]]), h["harness"], same))
        formats.setdefault((h["task"], h["metric"]), (mine.get("prompt_format"), h.get("chat_template")))
    out = []
    for (task, metric), triples in table.items():
        n = len(triples)
        fmt, chat = formats[(task, metric)]
        out.append({"model": model, "task": task, "metric": metric, "prompt_format": fmt,
                    "harness_chat_template": chat, "n": n,
                    "kvlib": sum(a for a, _, _ in triples) / n, "harness": sum(b for _, b, _ in triples) / n,
                    "same_score": sum(a == b for a, b, _ in triples) / n,
                    "same_prediction": sum(s for _, _, s in triples) / n})
    return out
