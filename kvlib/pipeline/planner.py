"""The cost and power plan of a profile run, before anything runs (`kvlib reproduce --profile P --dry-run`).

Cost: per notebook, the wall time it is predicted to take on this machine. The work its params ask for
(`planned_work`: prompts and their tokens, counted with the model's own tokenizer on a sample of the prompts the
task builders make, prefix reuse included where the backend reuses prefixes; new-token budgets; training
sequences x epochs) times the rates fitted (kvlib.engine.meter.fit_rates) to the cost records that earlier runs
published with their results (results/<profile>/<notebook>/cost.json): this profile's, else another profile's on
the same kind of machine, numerics and model size, else the stated priors of params/planner.yaml
(`PlannerParams`); plus each notebook's overhead (its last wall time beyond its recorded work, else the prior).
The output says which basis each prediction rests on.

Power: per pre-registered primary claim (kvlib.report.paper.PrimaryClaim), the 95% interval half-width expected at
the planned n (kvlib.engine.stats.expected_half_width: the spread of the units' paired differences, never below
the method's Newcombe floor), the spread measured on the profile's earlier item files (or another profile's with
the same models), else the claim's stated prior; the smallest effect that n detects with 80% power; and the n that
would reach the pre-registered width. `power_problems` is what stops a run whose primary claims cannot reach their
width (kvlib.pipeline.reproduce; `--allow-underpowered` runs anyway).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kvlib.engine import meter, models, stats
from kvlib.engine import train as training
from kvlib.engine.backends import BackendConfig, RawPrompt, Tokenization, planned_engine, shared_prefix_length
from kvlib.engine.config import ParamError, check_positive, fail, from_mapping, load_yaml, to_mapping
from kvlib.pipeline.manifest import entry_wall_seconds, load_manifest_entries
from kvlib.pipeline.notebooks import FINETUNE, profile_dataset, profile_finetune_params
from kvlib.pipeline.plan import NotebookJob
from kvlib.pipeline.rejudge import read_items
from kvlib.report.paper import ALPHA, CONTRAST, PrimaryClaim, equivalence_margin
from kvlib.tasks import flenqa, general, litm_kv, mdqa
from kvlib.tasks import synthetic as generate

PLANNER_FILE = "planner.yaml"  # params/planner.yaml: the stated priors (PlannerParams)
SAMPLE = 8  # items (questions, problems) whose prompts are tokenized to measure a task's prompt lengths
POWER = 0.8  # the power at which the smallest detectable difference is stated
MAX_UNITS = 10 ** 6  # the largest n searched for a claim's width (beyond it: "no n reaches it")
# The fewest paired units an earlier item file must hold to plan with its spread: a standard deviation from a
# handful of questions (a quick profile's) is noise, so such files are passed over for a larger one or the prior.
# Without either, a file of fewer units still shows where the original stands: at chance or floor, the claim is
# expected untestable (`Spread.untestable`) and stops no run.
MIN_SPREAD_UNITS = 30


# ------------------------------------------------------------------------------------------------- priors


@dataclass
class PartRate:
    """Seconds per token and per attention pair of one part of the work (kvlib.engine.meter)."""

    per_token: float = 0.0
    per_attention: float = 0.0

    def validate(self) -> None:
        for name in ("per_token", "per_attention"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0 (seconds), got {getattr(self, name)}")


@dataclass
class DevicePrior:
    """Prior rates on one kind of device, stated for a model of `parameters` parameters and scaled linearly with
    the parameters of the planned model (compute per token grows with the weights)."""

    parameters: int
    prefill: PartRate = field(default_factory=PartRate)
    decode: PartRate = field(default_factory=PartRate)
    train: PartRate = field(default_factory=PartRate)
    source: str = ""  # where the numbers come from

    def validate(self) -> None:
        check_positive("parameters", self.parameters)


@dataclass
class PlannerParams:
    """params/planner.yaml: what the planner assumes where no cost record measured it. `priors`: device type
    ("cpu", "cuda") -> DevicePrior. `overhead_seconds`: a notebook's time beyond its model work (kernel start,
    imports, data, tables) before a run of it recorded its own. `characters_per_token`: how prompts are counted
    where the model's tokenizer is not on this machine."""

    priors: dict[str, DevicePrior] = field(default_factory=dict)
    overhead_seconds: float = 30.0  # the quick profile's 01_synthetic_data, which runs no model: 0.5 min here
    characters_per_token: float = 4.0  # English text in BPE vocabularies of 32K-50K tokens

    def validate(self) -> None:
        check_positive("overhead_seconds", self.overhead_seconds, 0)
        if not self.characters_per_token > 0:
            fail("characters_per_token", f"must be > 0, got {self.characters_per_token}")


def load_planner_params(params_root: Path) -> tuple[PlannerParams, str]:
    """The priors of params_root/planner.yaml (the class defaults without one) and where they came from."""
    path = Path(params_root) / PLANNER_FILE
    if not path.is_file():
        return PlannerParams(), "kvlib.pipeline.planner.PlannerParams defaults"
    try:
        return from_mapping(PlannerParams, load_yaml(path)), path.as_posix()
    except ParamError as exc:
        raise ParamError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------- the work


@dataclass
class PlannedWork:
    """Compute a notebook's params ask for: `units` prompts (training: sequences x epochs) of one kind, each with
    `prefill` (tokens, attention pairs) as the backend computes them, `prompt_tokens` (what its new tokens attend
    to), `new_tokens` (its budget) or `train` (tokens, attention pairs of one training sequence). `key`: the
    kvlib.engine.meter.rate_key its rates must share (None: not predicted, `unpredicted` says why). `counted` False:
    already done on this machine (a finished training run)."""

    what: str
    key: tuple | None
    units: int
    prefill: tuple[float, float] = (0.0, 0.0)
    prompt_tokens: float = 0.0
    new_tokens: int = 0
    train: tuple[float, float] = (0.0, 0.0)
    counted: bool = True
    unpredicted: str = ""

    def parts(self, decoded_share: float) -> dict[str, tuple[float, float]]:
        """part -> (tokens, attention pairs) of all units, decoding `decoded_share` of the new-token budget."""
        out = {}
        if any(self.prefill):
            out["prefill"] = (self.units * self.prefill[0], self.units * self.prefill[1])
        if self.new_tokens:
            new = decoded_share * self.new_tokens
            out["decode"] = (self.units * new, self.units * (new * self.prompt_tokens + new * (new + 1) / 2))
        if any(self.train):
            out["train"] = (self.units * self.train[0], self.units * self.train[1])
        return out


class CharTokenization:
    """Tokens estimated from characters where the model's tokenizer is not on this machine: every
    `characters_per_token` characters one token, each the chunk's text, so prompts that share text share their
    leading tokens as they would with the tokenizer (prefix reuse is counted alike)."""

    def __init__(self, characters_per_token: float):
        self.step = max(1, round(characters_per_token))

    def _ids(self, text: str) -> list[str]:
        return [text[i:i + self.step] for i in range(0, len(text), self.step)] or [""]

    @staticmethod
    def _text(request: Any) -> str:
        if isinstance(request, RawPrompt):
            return request.text
        if isinstance(request, str):
            return request
        return "\n".join(str(m.get("content", "")) for m in request)

    def prompt_ids(self, requests: Sequence[Any]) -> list[list[str]]:
        return [self._ids(self._text(r)) for r in requests]

    def loglikelihood_inputs(self, requests: Sequence[Any]) -> list[list[str]]:
        return [self._ids(self._text(c) + k)[:-1] or [""] for c, k in requests]

    def sequence_tokens(self, messages: Sequence[Mapping[str, str]]) -> int:
        return len(self._ids(self._text(list(messages))))


def prefill_per_prompt(ids: Sequence[Sequence[Any]], prefix_cache: bool) -> tuple[float, float]:
    """Mean prefill tokens and attention pairs per prompt of a sample, as kvlib's decoder computes them: each
    prompt alone, or with the prefix cache in token order, each after the prefix it shares with the previous one
    (at least one token of its own)."""
    if not ids:
        return 0.0, 0.0
    order = sorted(ids) if prefix_cache else list(ids)
    tokens = attention = 0
    held: Sequence[Any] = []
    for prompt in order:
        past = min(shared_prefix_length(held, prompt), len(prompt) - 1) if prefix_cache else 0
        tokens += len(prompt) - past
        attention += meter.attention_pairs(past, len(prompt))
        held = prompt
    return tokens / len(ids), attention / len(ids)


@dataclass
class ModelGroup:
    """Models of a notebook that run alike: the same rate key, tokenizer and prefix reuse."""

    key: tuple | None
    spec: str  # whose tokenizer counts their prompts
    prefix_cache: bool
    labels: list[str]


class _Planning:
    """What planning one profile shares across its notebooks: the priors, the profile's base model, and caches of
    tokenizers, evaluation sets and samples (notebook 06 reads notebooks 03-05's)."""

    def __init__(self, profile: str, params_root: Path, planner: PlannerParams):
        self.profile, self.params_root, self.planner = profile, Path(params_root), planner
        self._sizers: dict[str, Any] = {}
        self._built: dict[tuple, Any] = {}  # what the task builders made, by what they were asked
        self.tokenized_with: set[str] = set()

    def _once(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    # -- models

    @functools.cached_property
    def base_model(self) -> str:
        try:
            return profile_finetune_params(self.profile, self.params_root).base_model
        except ParamError:
            return models.DEFAULT_MODEL

    def sizer(self, spec: str) -> Any:
        """The tokenization of model `spec` (kvlib.engine.backends.Tokenization) when this machine has it, else
        CharTokenization."""
        if spec not in self._sizers:
            sizer: Any = None
            try:
                if models.parameter_count(spec) is not None:  # its config (and tokenizer) are here: no download
                    sizer = Tokenization(spec)
                    self.tokenized_with.add(f"{spec}'s tokenizer")
            except (OSError, ValueError):
                sizer = None
            if sizer is None:
                sizer = CharTokenization(self.planner.characters_per_token)
                self.tokenized_with.add(f"{self.planner.characters_per_token:g} characters per token ({spec}'s "
                                        f"tokenizer is not on this machine)")
            self._sizers[spec] = sizer
        return self._sizers[spec]

    def eval_key(self, config: BackendConfig, spec: str) -> tuple | None:
        engine = planned_engine(config)
        if engine is None:
            return None
        backend, numerics, device = engine
        return meter.rate_key("generate", {"backend": backend, "numerics": numerics, "device": device,
                                           "machine": meter.machine(device),
                                           "parameters": models.parameter_count(spec)})

    def model_groups(self, configs: Mapping[str, BackendConfig]) -> list[ModelGroup]:
        """Models (label -> BackendConfig, a `run` finetuned from the profile's base model) grouped by how they run."""
        groups: dict[tuple, ModelGroup] = {}
        for label, config in configs.items():
            spec = self.base_model if config.run is not None else (config.model or models.DEFAULT_MODEL)
            key = self.eval_key(config, spec)
            identity = (key, spec if key is not None else "", config.prefix_cache)
            groups.setdefault(identity, ModelGroup(key, spec, config.prefix_cache, [])).labels.append(label)
        return list(groups.values())

    # -- work of one evaluation

    def generation(self, groups: Sequence[ModelGroup], what: str, requests: Sequence[Any], units: int,
                   new_tokens: int) -> list[PlannedWork]:
        """`units` generation prompts per model, measured on the sample `requests`."""
        out = []
        for group in groups:
            n = len(group.labels)
            if group.key is None:
                out.append(PlannedWork(f"{what}: {n} API model(s) x {units} prompts", None, n * units,
                                       unpredicted="API models"))
                continue
            ids = self.sizer(group.spec).prompt_ids(list(requests))
            out.append(PlannedWork(f"{what}: {n} model(s) x {units} prompts", group.key, n * units,
                                   prefill_per_prompt(ids, group.prefix_cache),
                                   float(np.mean([len(x) for x in ids])) if ids else 0.0, new_tokens))
        return out

    def loglikelihood(self, groups: Sequence[ModelGroup], what: str, item_requests: Sequence[Sequence[Any]],
                      items: int) -> list[PlannedWork]:
        """`items` log-likelihood items per model (requests with one model input share a forward pass), measured
        on the sample `item_requests` (each item's requests)."""
        out = []
        for group in groups:
            n = len(group.labels)
            if group.key is None:
                continue  # a chat API has no log-likelihoods: the task runs generatively there (not predicted)
            sizer = self.sizer(group.spec)
            passes = [list(dict.fromkeys(tuple(x) for x in sizer.loglikelihood_inputs(list(r))))
                      for r in item_requests]
            flat = [list(p) for item in passes for p in item]
            per_item = len(flat) / max(len(passes), 1)
            out.append(PlannedWork(f"{what}: {n} model(s) x {items} items ({per_item:.1f} passes each)", group.key,
                                   round(n * items * per_item), prefill_per_prompt(flat, False)))
        return out

    # -- data the notebooks build

    def sets_of(self, P: Any) -> dict:
        """The MDQA evaluation sets of notebook 03's (or 08's, 06's section) params, as the notebook builds them."""
        args = (list(P.settings), P.num_documents, P.num_questions, P.question_seed, P.distractor_seed, P.data_dir,
                P.random_documents_file)
        return self._once(("mdqa", json.dumps(args)), lambda: mdqa.build_eval_sets(*args))

    def dataset_sample(self, name: str, split: str) -> list:
        """Up to SAMPLE samples of a dataset of the profile: read from its files when generated, else drawn with
        its generator (the same config, so the same lengths)."""
        cfg, data_dir = profile_dataset(self.profile, name, self.params_root)
        if (Path(data_dir) / f"{split}.jsonl").is_file():
            return generate.load_dataset(Path(data_dir), split)[:SAMPLE]
        return self._once(("dataset", name, split), lambda: generate.generate_split(
            cfg, split, SAMPLE, models.load_token_counter(cfg.tokenizer).count))

    def general_task(self, name: str, settings: Any, data_dir: str | None, seed: int) -> Any:
        """A benchmark prepared as notebook 05 prepares it (kvlib.tasks.general.prepare_task)."""
        key = ("general", name, json.dumps(to_mapping(settings), sort_keys=True), data_dir, seed)
        return self._once(key, lambda: general.prepare_task(name, settings, data_dir, seed))


def _sample(items: Sequence[Any]) -> list[Any]:
    """Up to SAMPLE items spread over `items` (a stratified subsample lists its groups in turn)."""
    return list(items[::max(1, len(items) // SAMPLE)][:SAMPLE])


def _kv_requests(samples: Sequence[Any]) -> list[list[dict]]:
    return [[{"role": "user", "content": s.prompt}] for s in samples]


def _mdqa_work(planning: _Planning, P: Any, groups: Sequence[ModelGroup]) -> list[PlannedWork]:
    work = []
    for s in planning.sets_of(P).values():
        requests = [[{"role": "user", "content": prompt}] for e in _sample(s.examples)
                    for _, prompt in mdqa.position_prompts(e, P.positions)]
        work += planning.generation(groups, f"MDQA {s.setting}, {P.num_documents} documents", requests,
                                    len(s.examples) * len(P.positions), P.max_new_tokens)
    return work


def _flenqa_work(planning: _Planning, P: Any, groups: Sequence[ModelGroup]) -> list[PlannedWork]:
    cfg = P.generation
    per_length = 1 if cfg.variants == "one_per_length" else len(cfg.combos())
    if P.official_path:
        records = flenqa.select_records(flenqa.load_flenqa(P.official_path), cfg, P.official_problems_per_task)
        sample, units = records[::max(1, len(records) // (SAMPLE * 4))], len(records)
    else:  # each task at each length: the task's prompt around a mixin of that many tokens
        sample, units = [], len(cfg.tasks) * cfg.samples_per_task * len(cfg.lengths) * per_length
        for task in cfg.tasks:
            problem = flenqa.draw_problem(task, 0, cfg.seed)
            for length in cfg.lengths:
                sample.append(flenqa.FLenQARecord(
                    id="plan", problem_id="plan", task=task, label=problem.label, question=problem.question,
                    facts=problem.facts, mixin=" ".join(["word"] * length), ctx_size=length,
                    padding=cfg.paddings[0], dispersion=cfg.dispersions[0], source="regenerated", rule=problem.rule))
    work = []
    for style in P.styles:
        work += planning.generation(groups, f"FLenQA {style}", flenqa.build_requests(sample, style), units,
                                    P.new_tokens(style))
    return work


def _general_work(planning: _Planning, P: Any, groups: Sequence[ModelGroup]) -> list[PlannedWork]:
    work = []
    for spec, settings in P.task_list():
        task = planning.general_task(spec.name, settings, P.data_dir, P.seed)
        items = _sample(task.items)
        if general.resolve_variant(task, True) == "loglikelihood":
            work += planning.loglikelihood(
                groups, spec.title, [general.loglikelihood_requests(spec, i, task.shots_for(i)) for i in items],
                len(task.items))
        else:
            fmt = general.resolve_prompt_format(task, True) or "chat"
            requests = [general.build_prompt(spec, i, task.shots_for(i), P.fewshot_format, fmt) for i in items]
            work += planning.generation(groups, spec.title, requests, len(task.items), task.max_new_tokens)
    return work


def _training_work(planning: _Planning, name: str, job: Any, launcher: Any, sequences: int | None = None
                   ) -> PlannedWork:
    """One finetuning run: its training sequences x epochs (`sequences`: a baseline's, token-matched to the run's
    dataset; default the dataset's n_train), each as long as the dataset's samples in the chat template."""
    import torch

    cfg = job.train_config
    samples = planning.dataset_sample(job.dataset, "train")
    sizer = planning.sizer(planning.base_model)
    if isinstance(sizer, Tokenization):
        lengths = [len(training.tokenize_chat(sizer.tokenizer, s.messages())["input_ids"]) for s in samples]
    else:
        lengths = [sizer.sequence_tokens(s.messages()) for s in samples]
    n = sequences if sequences is not None else job.data_config.n_train
    passes = cfg.max_steps * cfg.global_batch_size if cfg.max_steps > 0 else math.ceil(n * cfg.epochs)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    launched = launcher is not None and launcher.kind == "accelerate"
    key = None if launched else meter.rate_key("train", {
        "numerics": training.resolve_precision(cfg.precision, cuda), "device": device,
        "machine": meter.machine(device), "method": cfg.method,
        "parameters": models.parameter_count(planning.base_model)})
    done = training.is_finished(cfg) if sequences is None and Path(cfg.train_file).is_file() else False
    what = (f"training {name}: {passes} sequences ({n} x {cfg.epochs:g} epochs)"
            + (f", launched on {launcher.num_processes} GPUs" if launched else "")
            + (" (finished here: not counted)" if done else ""))
    return PlannedWork(what, key, passes, train=(float(np.mean(lengths)),
                                                 float(np.mean([meter.attention_pairs(0, x) for x in lengths]))),
                       counted=not done, unpredicted="training launched as its own job" if launched else "")


def _work_01(planning: _Planning, P: Any) -> list[PlannedWork]:
    return []  # data generation only (the notebook's overhead)


def _work_02(planning: _Planning, P: Any) -> list[PlannedWork]:
    work = []
    eval_config = BackendConfig(kind="hf", dtype=P.eval_dtype, batch_size=P.eval_batch_size)
    key = planning.eval_key(eval_config, P.base_model)
    runs, scored_original = P.jobs(), set()
    for job in P.training_jobs():  # the sweep's trials, then the runs (kvlib.pipeline.notebooks)
        work.append(_training_work(planning, job.name, job, P.launcher))
        held = planning.dataset_sample(job.dataset, "eval")
        # held-out check: the finetune, and the original once per dataset (the response cache holds its answers)
        labels = ["finetuned"] + ([] if job.dataset in scored_original else ["original"])
        scored_original.add(job.dataset)
        work += planning.generation([ModelGroup(key, P.base_model, False, labels)], f"held-out {job.name}",
                                    _kv_requests(held), min(P.eval_samples, job.data_config.n_eval),
                                    P.max_new_tokens)
        if P.token_loss_samples and job.name in runs:  # one forward pass per sample and model
            ids = planning.sizer(P.base_model).prompt_ids(_kv_requests(held))
            loss_key = planning.eval_key(BackendConfig(kind="hf", dtype="float32"), P.base_model)
            work.append(PlannedWork(f"token losses {job.name}: 2 models x {P.token_loss_samples} samples", loss_key,
                                    2 * P.token_loss_samples, prefill_per_prompt(ids, False)))
    return work


def _work_03(planning: _Planning, P: Any) -> list[PlannedWork]:
    return _mdqa_work(planning, P, planning.model_groups(P.model_configs()))


def _work_04(planning: _Planning, P: Any) -> list[PlannedWork]:
    return _flenqa_work(planning, P, planning.model_groups(P.model_configs()))


def _work_05(planning: _Planning, P: Any) -> list[PlannedWork]:
    work = _general_work(planning, P, planning.model_groups(P.model_configs()))
    if P.harness_crosscheck:  # the same items once more through lm-evaluation-harness, per listed model
        harness = planning.model_groups({label: P.harness_model(label) for label in P.harness_crosscheck})
        work += [dataclasses.replace(w, what=f"harness cross-check, {w.what}")
                 for w in _general_work(planning, P, harness)]
    return work


def _work_06(planning: _Planning, P: Any) -> list[PlannedWork]:
    work = []
    finetune = profile_finetune_params(P.profile, P.params_root)
    match = P.match_job() if P.match is not None else None
    extra = {}
    for label in P.baselines:  # each token-matched to the synthetic set of `match` and trained with its recipe
        work.append(_training_work(planning, f"baseline {label}", match, finetune.launcher,
                                   sequences=match.data_config.n_train))
        extra[label] = P.baseline_backend(planning.base_model)  # finetuned from the base: its size and tokenizer
    for section in (P.mdqa_params(), P.flenqa_params(), P.general_params()):
        if section is None:
            continue
        groups = planning.model_groups({**section.model_configs(), **extra})
        work += {"MDQANotebookParams": _mdqa_work, "FLenQANotebookParams": _flenqa_work,
                 "GeneralBenchmarksNotebookParams": _general_work}[type(section).__name__](planning, section, groups)
    return work


def _work_07(planning: _Planning, P: Any) -> list[PlannedWork]:
    groups, work = planning.model_groups(P.model_configs()), []
    if P.in_distribution is not None:
        dataset = P.section_dataset("in_distribution")
        cfg, _ = profile_dataset(P.profile, dataset, Path(P.params_root))
        held = planning.dataset_sample(dataset, "eval")
        work += planning.generation(groups, "key-value, in distribution", _kv_requests(held),
                                    min(P.in_distribution.eval_samples, cfg.n_eval), P.max_new_tokens)
    if P.litm is not None:
        examples, _ = litm_kv.load_kv_retrieval(litm_kv.kv_retrieval_path(P.litm.num_keys, P.data_dir))
        requests = [[{"role": "user", "content": litm_kv.format_kv_prompt(
            litm_kv.with_gold_at(e, p, P.litm.num_pairs), e.key)}] for e in examples[:2] for p in P.litm.positions]
        work += planning.generation(groups, "LitM key-value", requests, P.litm.num_examples * len(P.litm.positions),
                                    P.litm.max_new_tokens)
    if P.grid is not None:
        cfg = P.grid_config()
        count = models.load_token_counter(cfg.tokenizer).count
        for d in P.grid.num_dicts:
            sample = generate.position_length_grid(cfg, [d], [0.5], 1, count_tokens=count)
            work += planning.generation(groups, f"key-value grid, {d} dictionaries", _kv_requests(sample),
                                        len(P.grid.relative_positions) * P.grid.samples_per_cell, P.max_new_tokens)
    return work


def _work_08(planning: _Planning, P: Any) -> list[PlannedWork]:
    # a finetune that did not learn its task is not evaluated (kvlib.pipeline.runs.learned_gate), which notebook 02
    # decides: the plan counts every model, the most the notebook can cost
    return _mdqa_work(planning, P, planning.model_groups(P.model_configs()))


# notebook -> the work its params ask for (a notebook without an entry: overhead only)
NOTEBOOK_WORK: dict[str, Callable[[_Planning, Any], list[PlannedWork]]] = {
    "01_synthetic_data": _work_01, FINETUNE: _work_02, "03_mdqa": _work_03, "04_flenqa": _work_04,
    "05_general_benchmarks": _work_05, "06_baselines": _work_06, "07_kv_retrieval": _work_07,
    "08_longer_context": _work_08,
}


def planned_work(planning: _Planning, job: NotebookJob) -> list[PlannedWork]:
    """The work notebook `job` asks for (NOTEBOOK_WORK), or ParamError/OSError when its data is not here."""
    function = NOTEBOOK_WORK.get(job.name)
    return [] if function is None else function(planning, job.config)


# ----------------------------------------------------------------------------------------------- the rates


def _records_of(folder: Path) -> dict[str, list[dict]]:
    """notebook -> the cost records its published results hold (folder/<notebook>/cost.json)."""
    return {p.parent.name: meter.read_records(p) for p in sorted(Path(folder).glob(f"*/{meter.COST_FILE}"))}


class RateBook:
    """Rates per kvlib.engine.meter.rate_key and part: fitted to this results folder's cost records, else to other
    profiles' under the same results root, else the prior of the device (scaled to the model's parameters)."""

    def __init__(self, out_dir: Path, results_root: Path, planner: PlannerParams, prior_source: str):
        self.out_dir, self.planner, self.prior_source = Path(out_dir), planner, prior_source
        self.own = _records_of(self.out_dir)
        self.other: dict[str, list[dict]] = {}
        for folder in sorted(Path(results_root).iterdir()) if Path(results_root).is_dir() else []:
            if folder.is_dir() and not folder.name.startswith(".") and folder.resolve() != self.out_dir.resolve():
                self.other[folder.name] = [r for rs in _records_of(folder).values() for r in rs]
        self._fits: dict[tuple, tuple[meter.Rates | None, str]] = {}

    def _fit(self, where: str, key: tuple) -> tuple[meter.Rates | None, str]:
        """The rates fitted to the records of `key` here (`where` "own") or in the other profiles, and where those
        records are (the basis the output names)."""
        if (where, key) not in self._fits:
            pools = {self.out_dir.name: self.own} if where == "own" else {
                name: {"": records} for name, records in self.other.items()}
            chosen, sources = [], []
            for name, by_notebook in pools.items():
                matching = [r for rs in by_notebook.values() for r in rs
                            if meter.rate_key(r["kind"], r.get("tags") or {}) == key]
                chosen += matching
                sources += [name] if matching else []
            basis = (f"measured ({', '.join(sources)})" if where == "own"
                     else f"measured on another profile ({', '.join(sources)})")
            self._fits[(where, key)] = (meter.fit_rates(chosen) if chosen else None, basis)
        return self._fits[(where, key)]

    def rate(self, key: tuple, part: str) -> tuple[PartRate, str] | None:
        """(rate, its basis) of `part` for work of `key`; None when nothing measured or states it."""
        for where in ("own", "other"):
            fit, basis = self._fit(where, key)
            if fit is not None and part in fit.per_token:
                return PartRate(fit.per_token[part], fit.per_attention[part]), basis
        device, parameters = key[3], key[5]  # see kvlib.engine.meter.rate_key
        prior = self.planner.priors.get(str(device))
        if prior is None or parameters is None:
            return None
        scale = parameters / prior.parameters
        rate = getattr(prior, part)
        return PartRate(rate.per_token * scale, rate.per_attention * scale), f"prior ({self.prior_source})"

    def decoded_share(self, notebook: str) -> float | None:
        """Share of the new-token budget this notebook's earlier run decoded (answers stop early), or None."""
        records = [r for r in self.own.get(notebook, []) if r.get("budget_tokens")]
        budget = sum(r["budget_tokens"] for r in records)
        decoded = sum((r.get("parts") or {}).get("decode", {}).get("tokens", 0) for r in records)
        return min(1.0, decoded / budget) if budget else None

    def overhead(self, notebook: str, entries: Mapping[str, Mapping[str, Any]]) -> tuple[float, str]:
        """The notebook's time beyond its recorded work: its last run's wall time minus its records' seconds,
        else the prior."""
        records, entry = self.own.get(notebook), entries.get(notebook) or {}
        if records is not None and entry.get("status") == "ok" and entry.get("wall_seconds") is not None:
            return max(0.0, entry["wall_seconds"] - sum(r.get("seconds") or 0.0 for r in records)), "measured"
        return self.planner.overhead_seconds, "prior"


# -------------------------------------------------------------------------------------------------- power


@dataclass
class ClaimPower:
    """A primary claim's planned interval: `n` units (None: unknown), the expected 95% `half_width` and the
    smallest `detectable` difference (points; None without an estimate), `needed` units to reach the claim's
    max_half_width (None: no n up to MAX_UNITS does), and what the spread came from (`basis`)."""

    notebook: str
    params_file: str
    index: int
    claim: PrimaryClaim
    n: int | None
    unit: str
    n_field: str
    half_width: float | None
    detectable: float | None
    needed: int | None
    basis: str
    untestable: str = ""  # why the original is not expected to clear chance at this n (the claim is not tested)

    @property
    def status(self) -> str:
        if self.untestable:
            return "UNTESTABLE"
        if self.half_width is None:
            return "NO ESTIMATE"
        return "OK" if self.half_width <= self.claim.max_half_width else "TOO WIDE"

    def problem(self) -> str | None:
        """One line naming the params file and field and the fix, for a claim that cannot reach its width (an
        expected untestable claim is left out of its family when judged, so it stops nothing)."""
        where = f"{self.params_file}: primary[{self.index}]"
        if self.status in ("OK", "UNTESTABLE"):
            return None
        if self.half_width is None:
            return (f"{where}: {self.claim.describe()}: no spread to plan with ({self.basis}); state "
                    f"primary[{self.index}].prior_sd (points), or run --allow-underpowered")
        fix = (f"raise {self.n_field} to about {self.needed}" if self.needed is not None else
               "no n reaches it (the seeds' own spread is wider): add seeds, or widen max_half_width")
        return (f"{where}.max_half_width: {self.claim.describe()} is expected to reach +-{self.half_width:.1f} points "
                f"at n={self.n} {self.unit} (spread from {self.basis}), wider than the pre-registered "
                f"+-{self.claim.max_half_width:g}: {fix}, or run --allow-underpowered")


@dataclass(frozen=True)
class Spread:
    """What a planned interval needs from earlier results or a prior: per floor table (one per setting a claim
    involves) the original's mean score and the units' difference standard deviation, the spread of the claim's
    own unit (`unit_sd`; a contrast's per-question contrast), the between-seed spread and the number of seeds."""

    unit_sd: float
    tables: tuple[tuple[float, float], ...]  # (the original's rate, unit sd) per setting
    seed_sd: float = 0.0
    seeds: int = 1
    units: int = 0  # how many units the earlier items paired (0: a prior)

    def half_width(self, n: int) -> float:
        tables = [stats.planned_table(n, rate, sd) for rate, sd in self.tables]
        return 100 * stats.expected_half_width(n, self.unit_sd, tables, self.seed_sd, self.seeds)

    def untestable(self, n: int, chance: float, margin: float) -> str:
        """Why the claim is expected untestable at n units (kvlib.report.paper.untestable_reason: the original's
        interval must clear its chance rate by `margin`), from the original's expected Wilson interval; '' when
        it is expected to clear it."""
        for rate, _ in self.tables:
            low, high = stats.wilson_ci(rate * n, n)
            if low < chance + margin:
                return (f"the original's {100 * rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}] at n={n} is not "
                        f"expected to clear {100 * chance:g}% by {100 * margin:.2f} points")
        return ""


def _needed(spread: Spread, limit: float) -> int | None:
    """The smallest n whose expected half-width is within `limit` (points), None beyond MAX_UNITS."""
    if spread.half_width(MAX_UNITS) > limit:
        return None
    low, high = 2, 2
    while spread.half_width(high) > limit:
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if spread.half_width(middle) > limit else (low, middle)
    return low


def _scores(rows: Sequence[Mapping[str, Any]], model_key: str, unit_key: str, value: str,
            where: Callable[[Mapping[str, Any]], bool]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if where(r) and r.get(value) is not None:
            out.setdefault(str(r[model_key]), {})[str(r[unit_key])] = float(r[value])
    return out


def _paired(scores: Mapping[str, Mapping[str, float]], base: str, members: Sequence[str]
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """(seeds x units differences, the original's scores) on the units every model scored, or None."""
    if base not in scores or any(m not in scores for m in members):
        return None
    units = sorted(set(scores[base]).intersection(*(scores[m] for m in members)))
    if not units:
        return None
    y = np.array([scores[base][u] for u in units])
    return np.array([[scores[m][u] for u in units] for m in members]) - y, y


def _mdqa_spread(rows: Sequence[Mapping[str, Any]], base: str, members: Sequence[str], setting: str
                 ) -> Spread | None:
    means = mdqa.mdqa_question_means(rows)
    by_setting = {s: _scores(means, "model", "qid", "correct", lambda r, label=label: r["setting"] == label)
                  for s, label in (("random", mdqa.SETTING_RANDOM), ("retrieved", mdqa.SETTING_RETRIEVED))}
    involved = ["random", "retrieved"] if setting == CONTRAST else [setting]
    pairs = [_paired(by_setting[s], base, members) for s in involved]
    if any(p is None for p in pairs):
        return None
    tables = tuple((float(y.mean()), stats.seed_item_spread(d)[0]) for d, y in pairs)
    if setting == CONTRAST:  # per question: gain with random minus gain with retrieved (the common questions)
        common = sorted(set.intersection(*(set(by_setting[s][base]) & set.intersection(
            *(set(by_setting[s][m]) for m in members)) for s in involved)))
        if not common:
            return None
        gain = {s: np.array([[by_setting[s][m][q] - by_setting[s][base][q] for q in common] for m in members])
                for s in involved}
        unit_sd, seed_sd = stats.seed_item_spread(gain["random"] - gain["retrieved"])
    else:
        unit_sd, seed_sd = stats.seed_item_spread(pairs[0][0])
    return Spread(unit_sd, tables, seed_sd, len(members), min(d.shape[1] for d, _ in pairs))


def _general_spread(rows: Sequence[Mapping[str, Any]], base: str, members: Sequence[str], task: str, metric: str
                    ) -> Spread | None:
    pair = _paired(_scores(rows, "model", "id", metric, lambda r: r.get("task") == task), base, members)
    if pair is None:
        return None
    d, y = pair
    unit_sd, seed_sd = stats.seed_item_spread(d)
    return Spread(unit_sd, ((float(y.mean()), unit_sd),), seed_sd, len(members), d.shape[1])


# notebook -> (item file, unit, how its units are set in params)
CLAIM_ITEMS = {"03_mdqa": ("mdqa_items.csv", "questions", "num_questions"),
               "08_longer_context": ("mdqa_items.csv", "questions", "num_questions"),
               "05_general_benchmarks": ("items.csv", "items", "tasks.{benchmark}.max_examples")}


def _claim_n(planning: _Planning, name: str, P: Any, claim: PrimaryClaim) -> int | None:
    if name == "05_general_benchmarks":
        return len(planning.general_task(claim.benchmark, P.tasks[claim.benchmark], P.data_dir, P.seed).items)
    sets = planning.sets_of(P)
    return min(len(s.examples) for s in sets.values())  # the same questions in every setting


def _file_labels(rows: Sequence[Mapping[str, Any]], P: Any, labels: Sequence[str]) -> list[str] | None:
    """The labels of `labels` (models of P) as an earlier item file names them: the same label, or else the file's
    label whose model_spec is the same finetuning run of notebook 02 (a run relabelled since, e.g. seed 0 of a
    former seed group); None when a model is not in the file."""
    runs = {label: config.run for label, config in P.model_configs().items()}
    specs: dict[str, str] = {}
    for r in rows:
        specs.setdefault(str(r["model"]), str(r.get("model_spec") or ""))
    out = []
    for label in labels:
        if label in specs:
            out.append(label)
            continue
        run = runs.get(label)
        same = [name for name, spec in specs.items() if run and run in Path(spec).parts]
        if len(same) != 1:
            return None
        out.append(same[0])
    return out


def _spread_from_items(name: str, P: Any, claim: PrimaryClaim, folders: Sequence[Path],
                       min_units: int = MIN_SPREAD_UNITS) -> tuple[Spread, str] | None:
    """The claim's spread from the first earlier item file (this profile's results, then other profiles') that
    holds the original and every model the claim involves on at least `min_units` units, with where it came
    from."""
    file, unit, _ = CLAIM_ITEMS[name]
    base = P.baseline if name == "05_general_benchmarks" else next(iter(P.models))
    members = list(P.seed_groups.get(claim.model, [claim.model]))
    for folder in folders:
        path = folder / name / file
        if not path.is_file():
            continue
        rows = read_items(path)
        labels = _file_labels(rows, P, [base, *members])
        if labels is None:
            continue
        if name == "05_general_benchmarks":
            metric = claim.metric or general.TASKS[claim.benchmark].headline
            spread = _general_spread(rows, labels[0], labels[1:], claim.benchmark, metric)
        else:
            spread = _mdqa_spread(rows, labels[0], labels[1:], claim.setting)
        if spread is not None and spread.units >= min_units:
            renamed = [f"{a} as {b}" for a, b in zip([base, *members], labels) if a != b]
            return spread, (f"{_shown(path)}: {spread.units} {unit}"
                            + (f", {spread.seeds} seeds" if spread.seeds > 1 else "")
                            + (f" ({', '.join(renamed)})" if renamed else ""))
    return None


def _shown(path: Path) -> str:
    """A path as the output names it: relative to the working directory when inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def claim_power(planning: _Planning, job: NotebookJob, folders: Sequence[Path]) -> list[ClaimPower]:
    """Every primary claim notebook `job` pre-registers, planned (`ClaimPower`)."""
    P, name = job.config, job.name
    primary = list(getattr(P, "primary", None) or [])
    if not primary or name not in CLAIM_ITEMS:
        return []
    _, unit, n_field = CLAIM_ITEMS[name]
    family = {c.artifact: sum(x.artifact == c.artifact for x in primary) for c in primary}
    out = []
    for i, claim in enumerate(primary):
        try:
            n = _claim_n(planning, name, P, claim)
        except (ParamError, OSError, ValueError) as exc:
            n, why = None, f"n unknown: {' '.join(str(exc).split())[:120]}"
        found = _spread_from_items(name, P, claim, folders)
        few_units: Spread | None = None  # from too few units to plan a width with: the original's level only
        if found is not None:
            spread, basis = found
        elif claim.prior_sd is not None:
            level = (50.0 if claim.prior_level is None else claim.prior_level) / 100
            spread = Spread(claim.prior_sd / 100, ((level, claim.prior_sd / 100),))
            basis = (f"the stated prior: primary[{i}].prior_sd {claim.prior_sd:g} points, the original at "
                     f"{100 * level:g}%")
        else:
            spread = None
            # Fewer units than a width can be planned from still show the original's level: a claim whose
            # original sits at chance or floor there is expected untestable, which stops nothing.
            few = _spread_from_items(name, P, claim, folders, min_units=1)
            basis = ("no earlier item file holds these models, and no prior_sd is stated" if few is None else
                     f"{few[1]}, too few to plan a width with (at least {MIN_SPREAD_UNITS}), and no prior_sd is stated")
            few_units = few[0] if few is not None else None
        if n is None:
            basis = why
        half = spread.half_width(n) if spread is not None and n is not None else None
        detectable = (100 * stats.detectable_difference(half / 100, n, ALPHA / family[claim.artifact], POWER)
                      if half is not None else None)
        needed = _needed(spread, claim.max_half_width) if spread is not None else None
        chance, margin = _chance(name, claim)
        judged = spread if spread is not None else few_units
        untestable = judged.untestable(n, chance, margin) if judged is not None and n is not None else ""
        out.append(ClaimPower(name, _shown(job.params_file), i, claim, n, unit,
                              n_field.format(benchmark=claim.benchmark), half, detectable, needed, basis, untestable))
    return out


def _chance(name: str, claim: PrimaryClaim) -> tuple[float, float]:
    """The chance rate (or floor) the claim's original must clear, and by how much (kvlib.report.paper)."""
    if name == "05_general_benchmarks":
        spec = general.TASKS[claim.benchmark]
        return spec.chance, equivalence_margin() if spec.chance_margin is None else spec.chance_margin
    return mdqa.MDQA_CHANCE, equivalence_margin()


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class NotebookPlan:
    name: str
    seconds: float | None  # predicted; None when a rate is missing or the work is unknown
    basis: list[str]  # where its rates and overhead came from
    work: list[PlannedWork]
    measured_seconds: float | None  # what its last run took (the manifest)
    claims: list[ClaimPower]
    problem: str = ""  # why its work could not be planned
    partial: bool = False  # some of its work is not predicted (API models, launched training): `seconds` omits it


@dataclass
class ProfilePlan:
    profile: str
    machine: str
    notebooks: list[NotebookPlan]
    tokenized_with: list[str]

    @property
    def claims(self) -> list[ClaimPower]:
        return [c for nb in self.notebooks for c in nb.claims]


def _predict(work: Sequence[PlannedWork], rates: RateBook, share: float) -> tuple[float | None, list[str]]:
    """The seconds of `work` at its rates (None when a part has no rate) and what they rest on."""
    total, bases = 0.0, []
    for w in work:
        if not w.counted:
            continue
        if w.key is None:
            bases.append(f"{w.unpredicted}: not predicted")
            continue
        for part, (tokens, attention) in w.parts(share).items():
            found = rates.rate(w.key, part)
            if found is None:
                size = "" if w.key[5] is not None else ", model size unknown: its config is not on this machine"
                return None, list(dict.fromkeys(
                    bases + [f"no rate for {part} ({w.key[3]}, {w.key[2]}{size}): no record, no prior"]))
            rate, basis = found
            total += rate.per_token * tokens + rate.per_attention * attention
            bases.append(f"{part} {basis}")
    return total, list(dict.fromkeys(bases))


def plan_profile_cost(profile: str, jobs: Sequence[NotebookJob], out_dir: Path, results_root: Path,
                      params_root: Path, with_cost: bool = True) -> ProfilePlan:
    """The cost and power plan of `jobs` (a validated profile run: kvlib.pipeline.plan), its rates and earlier
    items read from `out_dir` (the run's results folder) and the other profiles under `results_root`; priors
    from params_root/planner.yaml. `with_cost` False plans the primary claims only (what a run checks before it
    starts)."""
    planner, prior_source = load_planner_params(params_root)
    planning = _Planning(profile, _profiles_root(jobs, params_root), planner)
    rates = RateBook(out_dir, results_root, planner, prior_source) if with_cost else None
    entries = load_manifest_entries(out_dir)
    folders = [Path(out_dir)] + sorted(p for p in Path(results_root).glob("*") if p.is_dir()
                                      and not p.name.startswith(".") and p.resolve() != Path(out_dir).resolve())
    notebooks = []
    for job in jobs:
        if job.skip:
            continue
        claims = claim_power(planning, job, folders)
        if not with_cost:
            notebooks.append(NotebookPlan(job.name, None, [], [], None, claims))
            continue
        entry = entries.get(job.name) or {}
        measured = entry_wall_seconds(entry) if entry.get("status") == "ok" else None
        try:
            work = planned_work(planning, job)
        except (ParamError, OSError, ValueError) as exc:
            notebooks.append(NotebookPlan(job.name, None, [], [], measured, claims,
                                          problem=" ".join(str(exc).split())[:160]))
            continue
        share = rates.decoded_share(job.name)
        seconds, bases = _predict(work, rates, 1.0 if share is None else share)
        overhead, how = rates.overhead(job.name, entries)
        bases.append(f"overhead {how}" + ("" if share is None else f"; decoded {share:.0%} of the token budget"))
        notebooks.append(NotebookPlan(job.name, None if seconds is None else seconds + overhead, bases, work,
                                      measured, claims, partial=any(w.counted and w.key is None for w in work)))
    device = "cuda" if _cuda() else "cpu"
    return ProfilePlan(profile, meter.machine(device), notebooks, sorted(planning.tokenized_with))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _profiles_root(jobs: Sequence[NotebookJob], params_root: Path) -> Path:
    """Where the jobs read the profile's params from (a --model/--set run's own params folder)."""
    for job in jobs:
        root = getattr(job.config, "params_root", None)
        if root:
            return Path(root)
    return Path(params_root)


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}:{minutes % 60:02d}"


def format_plan(plan: ProfilePlan) -> list[str]:
    """The plan as the dry run prints it: per notebook the predicted and the last measured wall time (h:mm), the
    basis and the work; per primary claim n, the expected and pre-registered half-width, what it can detect, and
    OK / TOO WIDE."""
    lines = [f"Cost plan on this machine ({plan.machine}); prompts counted with "
             f"{'; '.join(plan.tokenized_with) or 'no tokenizer (no model work)'}:"]
    rows = [("notebook", "predicted", "last run", "basis")]
    for nb in plan.notebooks:
        basis = f"work unknown: {nb.problem}" if nb.problem else "; ".join(nb.basis)
        rows.append((nb.name, _hours(nb.seconds) + (" + ?" if nb.partial and nb.seconds is not None else ""),
                     _hours(nb.measured_seconds), basis))
    known = [nb.seconds for nb in plan.notebooks if nb.seconds is not None]
    complete = len(known) == len(plan.notebooks) and not any(nb.partial for nb in plan.notebooks)
    rows.append(("total", _hours(sum(known)) + ("" if complete else " + ?"), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    for nb in plan.notebooks:
        for w in nb.work:
            lines.append(f"    {nb.name}: {w.what}")
    lines.append("  Every prompt is counted, also those the response cache may already hold (an upper bound where it "
                 "does); finished training runs are not.")
    if plan.claims:
        lines.append("Primary claims (pre-registered: primary in the notebooks' params), 95% half-width in points:")
        header = ("notebook", "claim", "n", "expected", "max", "detectable", "status")
        table = [header] + [(c.notebook, c.claim.describe(), "?" if c.n is None else str(c.n),
                             "?" if c.half_width is None else f"+-{c.half_width:.1f}", f"+-{c.claim.max_half_width:g}",
                             "?" if c.detectable is None else f"{c.detectable:.1f}",
                             c.status + ("" if c.status != "TOO WIDE" or c.needed is None else f" (n ~ {c.needed})"))
                            for c in plan.claims]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(len(header))).rstrip() for r in table]
        for c in plan.claims:
            lines.append(f"    {c.notebook} {c.claim.describe()}: spread from {c.basis}"
                         + (f"; untestable: {c.untestable}" if c.untestable else ""))
        lines.append("  detectable: the smallest true difference found with 80% power by the claim's one-sided test "
                     "(Holm's first step in its artifact's primary family)")
        flagged = [c for c in plan.claims if c.problem()]
        if flagged:
            lines.append(f"  {len(flagged)} primary claim(s) cannot reach their pre-registered width: `kvlib "
                         f"reproduce` refuses to start this profile unless --allow-underpowered")
    return lines


def power_problems(profile: str, jobs: Sequence[NotebookJob], out_dir: Path, results_root: Path,
                   params_root: Path) -> list[str]:
    """One line per primary claim of `jobs` that cannot reach its pre-registered width (ClaimPower.problem)."""
    plan = plan_profile_cost(profile, jobs, out_dir, results_root, params_root, with_cost=False)
    return [p for p in (c.problem() for c in plan.claims) if p]
