"""How long the prompts a finetune trains on are beside the MDQA prompts it is meant to help, in the tokens the model
reads (its chat template included), so a profile can generate its synthetic training prompts as long as its test
prompts: the paper trains and tests Mistral-7B at ~4K tokens both ways (MDQA with 20 documents, 85 dictionaries).
`kvlib prompt-lengths` prints the table; the params comments that state such lengths name that command."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Sequence

from kvlib.engine.models import DEFAULT_MODEL, chat_prompt_lengths
from kvlib.tasks.mdqa import SETTINGS, build_eval_sets, format_qa_prompt
from kvlib.tasks.synthetic import GenerationConfig, generate


def length_stats(lengths: Sequence[int]) -> dict:
    """n, min, median, mean and max of token lengths (n 0 and None elsewhere for none)."""
    if not lengths:
        return {"n": 0, "min": None, "median": None, "mean": None, "max": None}
    return {"n": len(lengths), "min": min(lengths), "median": statistics.median(lengths),
            "mean": round(statistics.fmean(lengths), 1), "max": max(lengths)}


def mdqa_prompt_lengths(model: str = DEFAULT_MODEL, num_documents: int = 20, setting: str = "retrieved",
                        num_questions: int | None = None, data_dir: str | Path | None = None
                        ) -> tuple[list[int], str]:
    """(tokens per prompt, where the questions came from) of the MDQA prompts notebooks 03 and 08 build
    (kvlib.tasks.mdqa.build_eval_sets: `setting` distractors, `num_documents` documents, `num_questions` drawn with
    seed 0, all when None), each as `model` reads it (kvlib.engine.models.chat_prompt_lengths). The gold stays
    first: moving it to another position moves a passage, not the prompt's length."""
    eval_set = build_eval_sets([setting], num_documents, num_questions, 0, 0, data_dir)[setting]
    prompts = [format_qa_prompt(e.question, e.documents) for e in eval_set.examples]
    return chat_prompt_lengths(model, prompts), eval_set.source


def synthetic_prompt_lengths(config: GenerationConfig, model: str = DEFAULT_MODEL) -> list[int]:
    """Tokens per prompt of the train split of the synthetic dataset `config` (generated as `kvlib generate` and
    notebook 01 write it: the same samples), as `model` reads each one."""
    return chat_prompt_lengths(model, [s.prompt for s in generate(config)["train"]])


def length_table(datasets: Mapping[str, GenerationConfig], model: str = DEFAULT_MODEL, num_documents: int = 20,
                 setting: str = "retrieved", num_questions: int | None = None,
                 data_dir: str | Path | None = None) -> list[dict]:
    """One row for the MDQA prompts (`mdqa_prompt_lengths`), then one per synthetic dataset (name -> config; its
    train split) with its median's ratio to the MDQA median: what a profile's num_dicts and max_tokens are chosen
    from."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}, got {setting!r}")
    lengths, source = mdqa_prompt_lengths(model, num_documents, setting, num_questions, data_dir)
    mdqa = length_stats(lengths)
    rows = [{"prompts": f"MDQA, {num_documents} documents ({setting} distractors)", "task": "", "template": None,
             "num_dicts": None, "max_tokens": None, **mdqa, "median_vs_mdqa": 1.0, "source": source}]
    for name, config in datasets.items():
        stats = length_stats(synthetic_prompt_lengths(config, model))
        ratio = None if not stats["n"] else round(stats["median"] / mdqa["median"], 3)
        rows.append({"prompts": name, "task": config.task, "template": config.template,
                     "num_dicts": config.num_dicts, "max_tokens": config.max_tokens, **stats,
                     "median_vs_mdqa": ratio, "source": f"train split ({config.n_train} samples, seed {config.seed})"})
    return rows


def format_length_table(rows: Sequence[Mapping], model: str) -> str:
    """`length_table`'s rows as text: one line per set of prompts, then the MDQA source."""
    lines = [f"prompt tokens as {model} reads them (its chat template included):"]
    for r in rows:
        shape = f"num_dicts {r['num_dicts']}, max_tokens {r['max_tokens']}: " if r["num_dicts"] is not None else ""
        if not r["n"]:
            lines.append(f"  {r['prompts']}: {shape}no train samples")
            continue
        lines.append(f"  {r['prompts']}: {shape}n {r['n']}, median {r['median']:g}, min {r['min']}, "
                     f"mean {r['mean']:g}, max {r['max']} ({r['median_vs_mdqa']:.3f} x the MDQA median)")
    lines.append(f"MDQA questions: {rows[0]['source']}")
    return "\n".join(lines)
