"""What each notebook reads from the data directory (from its validated params), the check `kvlib reproduce`
makes before any compute, and `kvlib data` (status, fetch, the README table) on top of kvlib.engine.datasets."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kvlib.engine.datasets import (
    DataError,
    Dataset,
    DatasetStatus,
    UnknownDataset,
    _one_line,
    data_root,
    dataset_status,
    fetch,
    fetch_command,
    format_status,
    get,
    load_registry,
    registry_table,
    status,
    update_readme,
)
from kvlib.pipeline import plan
from kvlib.tasks.contamination import GENERAL_TASKS


@dataclass(frozen=True)
class Need:
    """Notebook `notebook` reads dataset `dataset` from data directory `data_dir` (None: the default) for `why`."""

    dataset: str
    data_dir: str | None
    why: str
    notebook: str = ""



GENERAL_DATASETS = {"mmlu": "mmlu", "hellaswag": "hellaswag", "gsm8k": "gsm8k", "triviaqa": "triviaqa",
                    "nq_open": "nq_open"}  # kvlib.tasks.general.TASKS name -> registry name



BASELINE_SOURCES = {  # kvlib.tasks.baseline_sets kind -> the registry datasets its generator reads
    "mdqa": ("mdqa-oracle", "mdqa-20docs"),
    "in2": ("squad", "hotpotqa"),
    "niah": ("niah-essays", "squad", "hotpotqa"),
}



def _mdqa_needs(config: Any, why: str) -> list[Need]:
    return [Need("mdqa-oracle", config.data_dir, why), Need("mdqa-20docs", config.data_dir, why)]



def _flenqa_needs(config: Any, why: str) -> list[Need]:
    if config.official_path or "different" not in config.generation.paddings:
        return []  # the official file is checked by the params; the regenerated data reads only the oracle file
    return [Need("mdqa-oracle", config.source_data_dir, f"{why} ('different' padding passages)")]



def _general_needs(config: Any, why: str) -> list[Need]:
    return [Need(GENERAL_DATASETS[name], config.data_dir, f"{why} ({name})")
            for name, settings in config.tasks.items() if settings.path is None and name in GENERAL_DATASETS]



def _baselines_needs(config: Any) -> list[Need]:
    needs = []
    if config.mdqa_params() is not None:
        needs += _mdqa_needs(config.mdqa_params(), "MDQA evaluation")
    if config.flenqa_params() is not None:
        needs += _flenqa_needs(config.flenqa_params(), "FLenQA evaluation")
    if config.general_params() is not None:
        needs += _general_needs(config.general_params(), "general benchmarks")
    if config.baselines:

        guard = config.source_data_dir
        needs += [Need("mdqa-oracle", guard, "contamination guard"), Need("mdqa-20docs", guard, "contamination guard")]
        needs += [Need(GENERAL_DATASETS[t], guard, "contamination guard") for t in GENERAL_TASKS]
        for label in config.baselines:
            cfg = config.baseline_config(label)
            sources = (tuple(cfg.multidocqa_datasets) if cfg.kind == "multidocqa"
                       else BASELINE_SOURCES.get(cfg.kind, ()))
            needs += [Need(name, cfg.data_dir, f"baseline {label!r} ({cfg.kind})") for name in sources]
    return needs



def needs_for(notebook: str, config: Any) -> list[Need]:
    """The registry datasets notebook `notebook` reads with its validated params object `config` (a
    kvlib.pipeline.notebooks.NOTEBOOKS class), deduplicated; [] for notebooks that read no data (01, 02) and for
    notebooks kvlib does not know."""
    if config is None:
        return []
    if notebook in ("03_mdqa", "08_longer_context"):
        needs = _mdqa_needs(config, "MDQA evaluation")
    elif notebook == "04_flenqa":
        needs = _flenqa_needs(config, "FLenQA")
    elif notebook == "05_general_benchmarks":
        needs = _general_needs(config, "general benchmarks")
    elif notebook == "06_baselines":
        needs = _baselines_needs(config)
    elif notebook == "07_kv_retrieval":
        litm = getattr(config, "litm", None)
        needs = [] if litm is None else [Need(f"kv-retrieval-{litm.num_keys}", config.data_dir, "LitM key-value retrieval")]
    else:
        needs = []
    seen: dict[tuple[str, str | None], Need] = {}
    for need in needs:
        seen.setdefault((need.dataset, need.data_dir), Need(need.dataset, need.data_dir, need.why, notebook))
    return list(seen.values())



def missing_for(notebook: str, config: Any, registry: Mapping[str, Dataset] | None = None) -> list[tuple[Need, DatasetStatus]]:
    """The needs of `notebook` (see needs_for) that its data directory cannot serve: (need, status) with the
    status's state missing or checksum mismatch (by size: fast). A subset or substitute kvlib reads is enough."""
    registry = load_registry() if registry is None else registry
    out = []
    for need in needs_for(notebook, config):
        st = dataset_status(get(need.dataset, registry), data_root(need.data_dir), verify=False, data_dir_arg=need.data_dir)
        if not st.usable:
            out.append((need, st))
    return out



def check_inputs(jobs: Sequence[Any], registry: Mapping[str, Dataset] | None = None,
                 profile: str | None = None) -> str | None:
    """Before anything computes: None when every data input of `jobs` (kvlib.pipeline.plan.NotebookJob: name and
    validated config) is in place, else ONE message naming every missing input, which notebooks read it, and
    the one command that fetches them all."""
    missing: dict[str | None, dict[str, tuple[DatasetStatus, list[str]]]] = {}
    for job in jobs:
        if getattr(job, "skip", None):
            continue
        for need, st in missing_for(job.name, job.config, registry):
            by_name = missing.setdefault(need.data_dir, {})
            by_name.setdefault(need.dataset, (st, []))[1].append(job.name)
    if not missing:
        return None
    count = sum(len(v) for v in missing.values())
    lines = [f"kvlib reproduce{' --profile ' + profile if profile else ''}: {count} data input"
             f"{'s are' if count != 1 else ' is'} missing; nothing was trained or evaluated:"]
    commands = []
    for data_dir, by_name in missing.items():
        root = data_root(data_dir)
        lines.append(f"  data directory {root if root is not None else '(none yet)'}"
                     + (f" (params data_dir: {data_dir})" if data_dir is not None else "") + ":")
        for name, (st, notebooks) in by_name.items():
            what = "checksum mismatch: " + "; ".join(st.problems) if st.state == "checksum mismatch" else st.state
            lines.append(f"    {name} ({what}), read by {', '.join(dict.fromkeys(notebooks))}")
        commands.append(fetch_command(by_name, data_dir))
    lines.append("Fetch them with: " + " && ".join(commands))
    return "\n".join(lines)



def profile_needs(profile: str, params_root: str | Path = "params", notebooks_dir: str | Path = "notebooks",
                  only: list[str] | None = None) -> list[Need]:
    """Every data input of a profile's notebooks (their params validated as `kvlib reproduce` does)."""

    jobs = plan.plan_profile(profile, only, Path(params_root), Path(notebooks_dir), Path("results") / profile)
    return [need for job in jobs if not job.skip for need in needs_for(job.name, job.config)]



def fetch_profile(profile: str, params_root: str | Path = "params", notebooks_dir: str | Path = "notebooks",
                  mirror: str | None = None, progress: bool = True, registry: Mapping[str, Dataset] | None = None,
                  hub_cache: str | Path | None = None, data_dir: str | Path | None = None,
                  out: Callable[[str], None] = print) -> list[Path]:
    """Fetch what the profile's notebooks need and their data directories cannot serve (a subset or substitute
    kvlib reads counts as there): a no-op when everything is present. `data_dir` stands for the default data
    directory (params that name their own data_dir keep it)."""
    registry = load_registry() if registry is None else registry
    todo: dict[str | None, list[str]] = {}
    for need in profile_needs(profile, params_root, notebooks_dir):
        where = need.data_dir if need.data_dir is not None else (None if data_dir is None else str(data_dir))
        st = dataset_status(get(need.dataset, registry), data_root(where), verify=False)
        if not st.usable:
            todo.setdefault(where, [])
            if need.dataset not in todo[where]:
                todo[where].append(need.dataset)
    if not todo:
        out(f"profile {profile}: every data input is present")
        return []
    installed = []
    for data_dir, names in todo.items():
        installed += fetch(names, data_dir, mirror, progress, registry=registry, hub_cache=hub_cache, out=out)
    return installed



def main_cli(args: Any) -> int:
    """`kvlib data status|fetch|table` (see kvlib.pipeline.cli)."""
    try:
        if args.data_command == "status":
            root, statuses = status(args.names, args.data_dir, verify=not args.no_verify)
            print(format_status(root, statuses))
            return 0
        if args.data_command == "fetch":
            if args.profile:
                if args.names:
                    raise DataError("give dataset names or --profile, not both")
                fetch_profile(args.profile, args.params_dir, args.notebooks, args.mirror, progress=not args.quiet,
                              data_dir=args.data_dir)
            else:
                fetch(args.names, args.data_dir, args.mirror, progress=not args.quiet, include_optional=args.all)
            return 0
        if args.data_command == "table":
            if args.update:
                changed = update_readme(args.update)
                print(f"{args.update}: data table {'updated' if changed else 'already up to date'}")
            else:
                print(registry_table(), end="")
            return 0
    except UnknownDataset as exc:
        print(f"kvlib data {args.data_command}: {exc}", file=sys.stderr)
        return 2
    except (DataError, OSError) as exc:
        print(f"kvlib data {args.data_command}: {_one_line(exc, 400)}", file=sys.stderr)
        return 1
    raise AssertionError(args.data_command)
