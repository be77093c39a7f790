"""Notebook 02's sweep over training length x learning rate x epochs: the recipe that runs saying `dataset: sweep`,
`learning_rate: sweep` or `epochs: sweep` train with. Each trial is an ordinary run of notebook 02
(kvlib.pipeline.runs trains it and scores it on held-out prompts, as every run), judged on its held-out value
accuracy; `select` is the stated rule that picks one, and the record written next to the trials (`write_record`)
is where the runs read the winner's values from (kvlib.pipeline.notebooks.FinetuneNotebookParams.jobs), valid while
the sweep's definition is the one it was made for (`read_record`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvlib.engine.io import atomic_write_text, dumps_json

SWEEP = "sweep"  # a run's value taken from the sweep's winner
SWEPT_FIELDS = ("learning_rate", "epochs")  # the TrainConfig fields a run may take from it
DATASET = "dataset"  # and its dataset: the one at the winner's training length (SweepParams.datasets)
TAKEN_FIELDS = (DATASET, *SWEPT_FIELDS)  # everything a run may take from the sweep
RECORD_FILE = "sweep.json"
# Longest first, because the paper trains at the length of the prompts it tests on: a shorter length wins only
# where no longer one learned.
RULE = ("the trials whose held-out value accuracy reaches learned_threshold and is above 0 have learned; among them, "
        "those at the longest training prompts (most dictionaries), then the highest accuracy; ties: the smaller "
        "learning rate x optimizer steps (the least training that did as well), then the smaller learning rate; no "
        "trial learned: no winner (the runs that take the sweep's values are not trained). Lengths are trained longest "
        "first, and once a trial has learned, the shorter lengths, which cannot win, are not trained")


def has_learned(value: float | None, threshold: float) -> bool:
    """A trial learned its task: its held-out value accuracy reaches `threshold` and is above 0 (a threshold of 0
    lets every finetune into the evaluations, but a recipe that answers nothing is none)."""
    return value is not None and value >= threshold and value > 0


def trial_name(dataset: str, learning_rate: float, epochs: float) -> str:
    """A trial's name (and its folder under the sweep's): `<dataset>-lr<learning rate>-ep<epochs>`, e.g.
    sweep-d20-lr3e-05-ep2."""
    return f"{dataset}-lr{learning_rate:g}-ep{epochs:g}"


def select(trials: Sequence[Mapping[str, Any]], threshold: float) -> dict:
    """The sweep's outcome by `RULE` from its trials (rows with trial, dataset, num_dicts (its training length),
    learning_rate, epochs, steps (optimizer steps taken), n and value: the held-out value accuracy): {winner, dataset,
    num_dicts, learning_rate, epochs, value, n, reason}.
    When no trial learned (`has_learned`), the winner is None and `reason` says so with the best accuracy measured:
    never a silent pick of the least bad."""
    if not trials:
        raise ValueError("a sweep needs at least one trial")
    learned = [t for t in trials if has_learned(t["value"], threshold)]
    if not learned:
        best = max(trials, key=lambda t: -1.0 if t["value"] is None else t["value"])
        measured = f"{best['value']:.1%} of {best['n']} ({best['trial']})" if best["value"] is not None else "none"
        why = f"is below {100 * threshold:g}%" if best["value"] and best["value"] < threshold else "is 0"
        return {"winner": None, "dataset": None, "num_dicts": None, "learning_rate": None, "epochs": None,
                "value": best["value"], "n": best["n"],
                "reason": f"no sweep trial learned its task: the best held-out value accuracy, {measured}, {why}"}
    best = min(learned, key=lambda t: (-t["num_dicts"], -t["value"], t["learning_rate"] * t["steps"],
                                       t["learning_rate"], t["epochs"]))
    return {"winner": best["trial"], "dataset": best["dataset"], "num_dicts": best["num_dicts"],
            "learning_rate": best["learning_rate"], "epochs": best["epochs"], "value": best["value"], "n": best["n"],
            "reason": f"{best['trial']}: held-out value accuracy {best['value']:.1%} of {best['n']} at "
                      f"{best['num_dicts']} dictionaries, learning rate {best['learning_rate']:g} x {best['steps']} "
                      f"steps"}


def write_record(path: str | Path, key: str, trials: Sequence[Mapping[str, Any]], outcome: Mapping[str, Any]) -> Path:
    """The sweep's trials and outcome, for the sweep definition `key` (FinetuneNotebookParams.sweep_key)."""
    atomic_write_text(Path(path), dumps_json({"key": key, "rule": RULE, "trials": list(trials), "outcome": outcome}))
    return Path(path)


def read_record(path: str | Path, key: str) -> dict | None:
    """The outcome the record at `path` holds for the sweep definition `key`; None when there is none yet, or it
    was made for another definition (other trials, data, held-out scoring or threshold): the sweep runs again."""
    path = Path(path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record["outcome"] if record.get("key") == key else None
