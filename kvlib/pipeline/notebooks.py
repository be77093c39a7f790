"""Each notebook's parameter contract: its params class (the one home of its defaults), the registry of
notebook names, and `start`, the one call a notebook's first code cell makes to get its validated params.

A notebook runs three ways, all through `start`:
- `kvlib reproduce` validates every notebook's params before any compute, then papermill injects them as one
  mapping (`kvlib_params`) with `results_dir` pointing at a staging folder that the runner publishes on success;
- opened as it is (JupyterLab, "run all"): `kvlib_params` is None, so the notebook takes the `quick` profile's
  params and writes into the git-ignored `results/interactive/`, never into a committed profile;
- `papermill` by hand: with `-p kvlib_params {...}` it writes where that mapping says, except into a committed
  profile's results (refused); a params YAML given with `-f` (its keys injected one by one) is refused, naming the
  `kvlib reproduce` command that runs it properly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping

from kvlib.engine import meter, resources
from kvlib.engine.backends import BackendConfig
from kvlib.engine.config import ParamError, check_positive, fail, from_mapping, load_yaml, to_mapping
from kvlib.engine.evaluate import check_seed_groups
from kvlib.engine.io import sha256_text
from kvlib.engine.models import check_model_spec
from kvlib.engine.openai_ft import OpenAIFinetuneConfig
from kvlib.engine.train import LauncherConfig, TrainConfig
from kvlib.pipeline import sweep
from kvlib.report import paper
from kvlib.tasks import harness
from kvlib.tasks.baseline_sets import KINDS, BaselineConfig
from kvlib.tasks.flenqa import STYLES, FLenQAConfig, Style
from kvlib.tasks.general import TASKS, FewshotFormat, TaskParams, TaskSpec, task_spec
from kvlib.tasks.mdqa import MAX_RANDOM_DOCUMENTS, RETRIEVED_DOCUMENTS, SETTINGS
from kvlib.tasks.synthetic import GenerationConfig


# params files planned but not written (yet): path -> data. `kvlib reproduce --model/--set` validates a profile's
# transformed params before anything is written (its --dry-run writes nothing), while notebooks read each other's
# params files (a run of 02, a dataset of 01) by path: they find the planned data here first.
_PARAMS_OVERLAY: dict[Path, dict] = {}


@contextlib.contextmanager
def params_overlay(files: Mapping[str | Path, Mapping[str, Any]]) -> Iterator[None]:
    """Within the block, `read_params_file(path)` returns `files[path]` (a deep copy) instead of reading it."""
    added = {}
    for path, data in files.items():
        for key in (Path(path), Path(path).resolve()):
            added[key] = copy.deepcopy(dict(data))
    previous = dict(_PARAMS_OVERLAY)
    _PARAMS_OVERLAY.update(added)
    try:
        yield
    finally:
        _PARAMS_OVERLAY.clear()
        _PARAMS_OVERLAY.update(previous)


def read_params_file(path: str | Path) -> dict:
    """A params YAML as data: the planned one of `params_overlay` if any, else the file."""
    path = Path(path)
    for key in (path, path.resolve()):
        if key in _PARAMS_OVERLAY:
            return copy.deepcopy(_PARAMS_OVERLAY[key])
    return load_yaml(path)


def model_configs(models: Mapping[str, Any], backend: Mapping[str, Any] | None, profile: str,
                  params_root: str | Path = "params") -> dict[str, BackendConfig]:
    """label -> BackendConfig of each entry of `models` laid over the `backend` defaults, validated; a `run`
    must be a run of the profile's 02_finetune params (checked here, trained only when opened)."""

    if not isinstance(models, Mapping) or not models:
        fail("models", "at least one model is required: label -> {model: <spec>} or {run: <02_finetune run>}")
    backend = dict(backend or {})
    if "model" in backend or "run" in backend:
        fail("backend", "holds defaults shared by all models; set model/run per entry of models")
    configs, runs = {}, None
    for label, entry in models.items():
        if not isinstance(label, str) or not label.strip():
            fail("models", f"labels must be non-empty strings, got {label!r}")
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            fail(f"models.{label}", f"expected a mapping like {{model: ...}} or {{run: ...}}, got {entry!r}")
        entry = dict(entry)
        flag = entry.pop(SYNTHETIC_FLAG, None)
        if flag is not None and not isinstance(flag, bool):
            fail(f"models.{label}.{SYNTHETIC_FLAG}", f"expected true/false, got {flag!r}")
        config = from_mapping(BackendConfig, {**backend, **entry}, f"models.{label}")
        if config.run is not None:
            if runs is None:
                hf_runs, openai_runs = run_names(profile, params_root)
                runs = {**{r: "hf" for r in hf_runs}, **{r: "openai" for r in openai_runs}}
            if config.run not in runs:
                fail(f"models.{label}.run", f"{config.run!r} is not a run of params/{profile}/02_finetune.yaml "
                                            f"(runs: {', '.join(runs) or 'none'})")
            if (runs[config.run] == "openai") != (config.kind == "openai"):
                fail(f"models.{label}.kind", f"run {config.run!r} is an {runs[config.run]} run: set kind: "
                                             f"{'openai' if runs[config.run] == 'openai' else 'hf, vllm or auto'}")
        configs[label] = config
    return configs



# a model entry's flag: finetuned on the synthetic key-value data (so judged on the paper's claims) or not
SYNTHETIC_FLAG = "synthetic"


def is_synthetic(entry: Any) -> bool:
    """Whether a `models:` entry is declared as finetuned on the synthetic data: `synthetic: true`, or a `run:` of
    notebook 02 (every run there trains on a synthetic dataset of notebook 01) without `synthetic: false`."""
    if not isinstance(entry, Mapping):
        return False
    flag = entry.get(SYNTHETIC_FLAG)
    return flag if isinstance(flag, bool) else entry.get("run") is not None


def synthetic_models(models: Mapping[str, Any], base: str | None, seed_groups: Mapping[str, Any] | None = None
                     ) -> list[str]:
    """The labels judged on the paper's claims against `base`: the models finetuned on the synthetic data
    (`is_synthetic`), seed groups standing in for their members (a group counts when all its members do). Every
    other model compared with `base` (another original, a model added with --set) is reported in the difference
    tables but not judged."""
    groups = dict(seed_groups or {})
    members = {m for ms in groups.values() for m in ms}
    labels = [label for label, entry in models.items()
              if label != base and label not in members and is_synthetic(entry)]
    return labels + [g for g, ms in groups.items() if ms and all(is_synthetic(models.get(m)) for m in ms)]


@dataclass
class EvalModelsParams:
    """The params every evaluation notebook shares (subclass it and add the task's own fields)."""

    profile: str = "quick"
    results_dir: str = "results/quick"
    params_root: str = "params"
    models: dict[str, Any] = field(default_factory=lambda: {"original": {}})
    backend: dict[str, Any] = field(default_factory=dict)  # BackendConfig defaults for every model
    cache_dir: str | None = "runs/cache"  # on-disk response cache; None: off
    # group label -> model labels trained alike on datasets of different seeds (the paper averages seeds
    # 0/1/2): reported as the mean over seeds with a CI across seeds beside the per-item bootstrap CI
    seed_groups: dict[str, list[str]] = field(default_factory=dict)

    def model_configs(self) -> dict[str, BackendConfig]:
        return model_configs(self.models, self.backend, self.profile, self.params_root)

    def synthetic_models(self, base: str | None) -> list[str]:
        """The models (and seed groups) judged on the paper's claims against `base`: see `synthetic_models`."""
        return synthetic_models(self.models, base, self.seed_groups)

    def _check_primary(self, primary: list[paper.PrimaryClaim], artifacts: Mapping[str, tuple[str, ...]],
                       base: str | None) -> None:
        """Each pre-registered primary claim (a `primary:` entry) names an artifact this notebook judges
        (`artifacts`: id -> its settings, or () for benchmarks) and a model or seed group it judges against `base`,
        once each; the notebook checks the setting or benchmark."""
        judged = self.synthetic_models(base)
        seen: dict[str, int] = {}
        for i, claim in enumerate(primary):
            where = f"primary[{i}]"
            if claim.artifact not in artifacts:
                fail(f"{where}.artifact", f"{claim.artifact!r} is not judged by this notebook; it judges "
                                          f"{', '.join(artifacts)}")
            if claim.model not in judged:
                fail(f"{where}.model", f"{claim.model!r} is not a model or seed group this notebook judges against "
                                       f"{base!r}; judged: {', '.join(judged) or 'none'}")
            key = claim.describe()
            if key in seen:
                fail(where, f"the same claim as primary[{seen[key]}] ({key}): pre-register each claim once")
            seen[key] = i

    def validate(self) -> None:
        configs = self.model_configs()
        check_seed_groups(self.seed_groups, list(configs))


@dataclass
class SyntheticDataNotebookParams:
    """Parameters of notebooks/01_synthetic_data.ipynb: several datasets sharing one output root."""

    profile: str = "quick"
    results_dir: str = "results/quick"
    data_dir: str = "runs/data"  # where generated JSONL goes (not committed; results/ keeps the report)
    datasets: dict[str, GenerationConfig] = field(default_factory=dict)
    examples_to_show: int = 1

    def validate(self) -> None:
        if not self.datasets:
            fail("datasets", "at least one dataset is required")
        for name in self.datasets:
            if not name.replace("-", "").replace("_", "").isalnum():
                fail(f"datasets.{name}", "dataset names may contain letters, digits, '-' and '_' only")
        check_positive("examples_to_show", self.examples_to_show, 0)



def profile_dataset(profile: str, name: str, params_root: Path = Path("params")) -> tuple[GenerationConfig, Path]:
    """Config and output directory of dataset `name` of a profile. Datasets are defined once, in
    params/<profile>/01_synthetic_data.yaml, and every later notebook refers to them by name."""
    path = Path(params_root) / profile / "01_synthetic_data.yaml"
    params = from_mapping(SyntheticDataNotebookParams, read_params_file(path))
    if name not in params.datasets:
        raise ParamError(f"dataset: {name!r} is not defined in {path}; known: {', '.join(params.datasets)}")
    return params.datasets[name], Path(params.data_dir) / profile / name


@dataclass
class FinetuneJob:
    name: str
    dataset: str
    data_config: Any  # kvlib.tasks.synthetic.GenerationConfig
    data_dir: Path
    train_config: TrainConfig
    from_sweep: tuple[str, ...] = ()  # the fields taken from the sweep's winner (`sweep` in params): dataset, ...
    # The sweep has not run yet: the job holds the longest candidate dataset and the grid's largest learning rate and
    # epochs (what the run costs at most), and it trains once the sweep has picked (kvlib.pipeline.runs.ready_job).
    awaiting_sweep: bool = False
    not_trained: str | None = None  # why this run is not trained: no sweep trial learned its task



# Why the default sweep grid: the embedded 135M model learned the task at batch 1 with lr 1e-5 over 240 steps
# (results/cpu/02_finetune/heldout_accuracy.csv of the 1K-token recipe: 80-93% held-out value accuracy), lr x steps
# 2.4e-3. At global batch 16, 160-350 samples over 1-2 epochs are 10-44 optimizer steps, so that lr x steps needs lr
# 5e-5 to 2.4e-4 (a step on 16 samples is less noisy than one on 1, so at least as useful); the paper's own lr x steps
# (5e-6 x 44 on Mistral-7B, 2.2e-4) needs 5e-6 to 2.2e-5. The grid spans both, a factor ~3 apart from 1e-5 to 3e-4,
# at the paper's 2 epochs and at 1.
@dataclass
class SweepParams:
    """Notebook 02's sweep over training length x learning rate x epochs (kvlib.pipeline.sweep): one trial per
    triple, each an ordinary run of notebook 02 on one of `datasets` with the other TrainConfig fields `train` gives
    (the recipe of the runs that take the sweep's values: accumulation, precision, seed, ...), judged on its held-out
    value accuracy like every run (`eval_samples` prompts of the dataset's eval split, Wilson CIs). The winner
    (kvlib.pipeline.sweep.RULE) gives its learning rate and epochs to every run that says `sweep` for them, and to a
    run that says `dataset: sweep` the dataset paired with the winner's."""

    # trial dataset -> the dataset of the same prompts' length that runs saying `dataset: sweep` train on; both
    # defined in the profile's 01_synthetic_data.yaml. One entry: a learning-rate x epochs sweep at one length.
    datasets: dict[str, str] = field(default_factory=dict)
    learning_rates: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4])
    epochs: list[float] = field(default_factory=lambda: [1.0, 2.0])
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.datasets:
            fail("datasets", "required: {trial dataset: run dataset}, datasets of this profile's "
                             "01_synthetic_data.yaml of one length each (the trials train on the first)")
        for name in ("learning_rates", "epochs"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values) or any(v <= 0 for v in values):
                fail(name, f"expected a list of distinct numbers > 0, got {values!r}")
        for key in ("train_file", "out_dir", "model", *sweep.SWEPT_FIELDS, "max_steps"):
            if key in self.train:
                why = ("would replace the epochs grid" if key == "max_steps" else "is the grid's, above"
                       if key in sweep.SWEPT_FIELDS else "is set by the notebook (from dataset, models_dir, base_model)")
                fail(f"train.{key}", why)

    def grid_max(self, key: str) -> float:
        """The grid's largest value of a swept TrainConfig field (learning_rate or epochs)."""
        return max(self.learning_rates if key == "learning_rate" else self.epochs)



@dataclass
class FinetuneNotebookParams:
    """Parameters of notebooks/02_finetune.ipynb. Each run names a dataset of the profile (defined in its
    01_synthetic_data.yaml) and any TrainConfig fields; train_file, out_dir and model are filled in. A run's
    learning_rate and epochs may say `sweep`: the values of the winner of the `sweep` section's trials."""

    profile: str = "quick"
    results_dir: str = "results/quick"
    params_root: str = "params"
    models_dir: str = "runs/models"
    base_model: str = "smollm2-135m-instruct"
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_samples: int = 40  # held-out (eval split) samples per run, scored before and after
    max_new_tokens: int = 48
    eval_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    eval_batch_size: int = 8
    # A finetune learned its task when its value accuracy on those held-out prompts reaches this: only then does it
    # enter the evaluation notebooks (kvlib.pipeline.runs.learned_gate), and only then can a sweep trial win. 0 lets
    # every finetune in (for a profile that checks that the notebooks run, not what finetuning does).
    learned_threshold: float = 0.5
    sweep: SweepParams | None = None  # the learning-rate x epochs sweep; None: no sweep
    examples_to_show: int = 3
    token_loss_samples: int = 8  # held-out samples per run for the token-level loss (Fig. 4); 0: skip
    # GPT-3.5 arm: name -> {dataset, OpenAIFinetuneConfig fields}; the train file is the dataset's
    # train.openai.jsonl. Without openai_submit only validation and the cost estimate run (offline, no key).
    openai_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    openai_submit: bool = False
    # how the HF runs train: in the notebook's process (None, or kind inprocess), or launched as their own
    # multi-GPU job (kind accelerate: `accelerate launch --config_file ... -m kvlib train`). With num_processes N
    # each run's gradient_accumulation_steps is split over the N processes, so the global batch stays
    # per_device_batch_size x gradient_accumulation_steps as written in runs.
    launcher: LauncherConfig | None = None

    def validate(self) -> None:
        if not self.runs and not self.openai_runs:
            fail("runs", "at least one run (or openai_runs entry) is required")
        check_positive("eval_samples", self.eval_samples)
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("eval_batch_size", self.eval_batch_size)
        check_positive("examples_to_show", self.examples_to_show, 0)
        check_positive("token_loss_samples", self.token_loss_samples, 0)
        if not 0 <= self.learned_threshold <= 1:
            fail("learned_threshold", f"a held-out value accuracy in [0, 1], got {self.learned_threshold}")
        if self.runs:
            check_model_spec(self.base_model, "base_model")  # a local path that does not exist fails at planning
        self.sweep_jobs()  # the grid's trials, checked as runs are
        self.jobs()  # every run's dataset and training fields, checked before any work
        self.openai_jobs()

    def _dataset_of(self, section: str, name: str, spec: dict, reserved: tuple[str, ...]):

        if not isinstance(spec.get("dataset"), str):
            fail(f"{section}.{name}.dataset", "required: the name of a dataset of this profile")
        for key in reserved:
            if key in spec:
                fail(f"{section}.{name}.{key}", "is set by the notebook (from dataset, models_dir, base_model)")
        try:
            data_config, data_dir = profile_dataset(self.profile, spec["dataset"], Path(self.params_root))
        except ParamError as exc:
            raise ParamError(f"{section}.{name}.{exc}") from None
        fields = {k: v for k, v in spec.items() if k != "dataset"}
        return spec["dataset"], data_config, data_dir, fields

    def _train_config(self, fields: dict, data_dir: Path, out_dir: Path, where: str) -> TrainConfig:
        """A run's (or trial's) TrainConfig: its fields, its dataset's train file, its out_dir and the base model;
        under a multi-process launcher its accumulation split over the processes (the global batch as written)."""
        cfg = from_mapping(TrainConfig, {**fields, "train_file": str(data_dir / "train.jsonl"), "out_dir": str(out_dir),
                                         "model": self.base_model}, where)
        processes = self.launcher.num_processes if self.launcher is not None else 1
        if cfg.gradient_accumulation_steps % processes:
            fail(f"{where}.gradient_accumulation_steps",
                 f"{cfg.gradient_accumulation_steps} does not split over launcher.num_processes {processes}: the "
                 f"global batch (per_device_batch_size x gradient_accumulation_steps) is shared by the processes")
        if processes > 1:
            cfg = dataclasses.replace(cfg, gradient_accumulation_steps=cfg.gradient_accumulation_steps // processes)
        return cfg

    @staticmethod
    def _check_heldout(where: str, data_config: Any) -> None:
        if data_config.n_eval < 1:
            fail(where, f"its dataset has n_eval {data_config.n_eval}: the held-out check (did the finetune learn its "
                        f"task?) needs at least one eval prompt")

    def jobs(self) -> dict[str, FinetuneJob]:
        """The HF runs, each with its dataset and TrainConfig; a `sweep` value is the winner's once the sweep has
        run (`sweep_outcome`; before that, and when no trial won, see FinetuneJob)."""
        outcome = self.sweep_outcome()
        winner = outcome is not None and outcome["winner"] is not None
        jobs = {}
        for name, spec in self.runs.items():
            spec = dict(spec)
            for key, value in spec.items():
                if value == sweep.SWEEP and key not in sweep.TAKEN_FIELDS:
                    fail(f"runs.{name}.{key}", f"only {' and '.join(sweep.TAKEN_FIELDS)} can be taken from the sweep")
            swept = tuple(k for k in sweep.TAKEN_FIELDS if spec.get(k) == sweep.SWEEP)
            if swept and self.sweep is None:
                fail(f"runs.{name}.{swept[0]}", "is 'sweep' but this profile has no sweep section: add one "
                                                "(sweep: {datasets: ...}) or give a value")
            if sweep.DATASET in swept:
                # before the sweep, and when it found no recipe: the longest candidate's (what the run costs at most)
                spec["dataset"] = self.sweep.datasets[outcome["dataset"] if winner else self._longest_candidate()]
            dataset, data_config, data_dir, fields = self._dataset_of(
                "runs", name, spec, ("train_file", "out_dir", "model"))
            self._check_heldout(f"runs.{name}.dataset", data_config)
            for key in swept:
                if key in sweep.SWEPT_FIELDS:
                    fields[key] = outcome[key] if winner else self.sweep.grid_max(key)
            cfg = self._train_config(fields, data_dir, Path(self.models_dir) / self.profile / name, f"runs.{name}")
            jobs[name] = FinetuneJob(name, dataset, data_config, data_dir, cfg, swept,
                                     awaiting_sweep=bool(swept) and outcome is None,
                                     not_trained=outcome["reason"] if swept and outcome is not None and not winner
                                     else None)
        return jobs

    def sweep_candidates(self) -> dict[str, tuple[Any, Path]]:
        """trial dataset -> (its GenerationConfig, its data directory), longest first; checked: the paired run
        dataset is defined and of its length (task, template, num_dicts and max_tokens equal), one trial dataset per
        length, every one with held-out prompts."""
        candidates = {}
        for trial_set, run_set in (self.sweep.datasets.items() if self.sweep is not None else ()):
            found = []
            for name in (trial_set, run_set):
                try:
                    found.append(profile_dataset(self.profile, name, Path(self.params_root)))
                except ParamError as exc:
                    raise ParamError(f"sweep.datasets.{exc}") from None
                self._check_heldout(f"sweep.datasets.{name}", found[-1][0])
            shape = [(c.task, c.template, c.num_dicts, c.max_tokens) for c, _ in found]
            if shape[0] != shape[1]:
                fail(f"sweep.datasets.{trial_set}", f"{run_set} is not of its length: (task, template, num_dicts, "
                                                    f"max_tokens) {shape[1]} vs {shape[0]}")
            num_dicts = found[0][0].num_dicts
            if any(c.num_dicts == num_dicts for c, _ in candidates.values()):
                fail(f"sweep.datasets.{trial_set}", f"another trial dataset has {num_dicts} dictionaries too: one "
                                                    f"per training length")
            candidates[trial_set] = found[0]
        return dict(sorted(candidates.items(), key=lambda item: -item[1][0].num_dicts))

    def _longest_candidate(self) -> str:
        return next(iter(self.sweep_candidates()))

    def sweep_jobs(self) -> dict[str, FinetuneJob]:
        """The sweep's trials (name -> job; none without a sweep) in grid order, every learning rate at every
        number of epochs at every length (longest first), each trained into `sweep_dir`/<trial>."""
        jobs = {}
        for dataset, (data_config, data_dir) in self.sweep_candidates().items():
            for lr in self.sweep.learning_rates:
                for epochs in self.sweep.epochs:
                    name = sweep.trial_name(dataset, lr, epochs)
                    cfg = self._train_config({**self.sweep.train, "learning_rate": lr, "epochs": epochs}, data_dir,
                                             self.sweep_dir / name, "sweep.train")
                    jobs[name] = FinetuneJob(name, dataset, data_config, data_dir, cfg)
        return jobs

    def training_jobs(self) -> list[FinetuneJob]:
        """Every training run this notebook does, in the order it does them: the sweep's trials, then the runs (a
        run waiting for the sweep at the grid's largest values; a run the sweep left without a recipe is not
        trained, so not listed). What a planner predicts the notebook's training cost from."""
        return [*self.sweep_jobs().values(), *(j for j in self.jobs().values() if j.not_trained is None)]

    @property
    def sweep_dir(self) -> Path:
        """Where the sweep's trials train and its record is written."""
        return Path(self.models_dir) / self.profile / "sweep"

    def heldout_settings(self) -> dict:
        """How the held-out prompts are scored (kvlib.pipeline.runs.score_heldout): a change scores them again."""
        return {"eval_samples": self.eval_samples, "max_new_tokens": self.max_new_tokens,
                "eval_dtype": self.eval_dtype, "eval_batch_size": self.eval_batch_size}

    def sweep_key(self) -> str:
        """What the sweep's outcome depends on: its trials' configs and data, the held-out scoring, the threshold."""
        trials = {name: [to_mapping(j.train_config), to_mapping(j.data_config)] for name, j in self.sweep_jobs().items()}
        return sha256_text(json.dumps({"trials": trials, "heldout": self.heldout_settings(),
                                       "learned_threshold": self.learned_threshold}, sort_keys=True))

    def sweep_outcome(self) -> dict | None:
        """The sweep's outcome (kvlib.pipeline.sweep.select) once it has run for this definition; None before that,
        and without a sweep."""
        if self.sweep is None:
            return None
        return sweep.read_record(self.sweep_dir / sweep.RECORD_FILE, self.sweep_key())

    def template_pairs(self) -> list[tuple[str, str]]:
        """(run with template, run without) pairs whose datasets differ only in the template, so their samples
        are the same dictionaries and answers (compared item by item in Fig. 4)."""

        jobs = self.jobs()
        def key(job):
            return {k: v for k, v in dataclasses.asdict(job.data_config).items() if k != "template"}
        return [(a, b) for a, ja in jobs.items() if ja.data_config.template
                for b, jb in jobs.items() if not jb.data_config.template and key(ja) == key(jb)
                and ja.train_config.seed == jb.train_config.seed]

    def openai_jobs(self) -> dict[str, FinetuneJob]:

        jobs = {}
        for name, spec in self.openai_runs.items():
            dataset, data_config, data_dir, fields = self._dataset_of(
                "openai_runs", name, dict(spec), ("train_file", "job_dir"))
            cfg = from_mapping(OpenAIFinetuneConfig, {
                **fields, "train_file": str(data_dir / "train.openai.jsonl"),
                "job_dir": str(Path(self.models_dir) / self.profile / name)}, f"openai_runs.{name}")
            jobs[name] = FinetuneJob(name, dataset, data_config, data_dir, cfg)
        return jobs



def profile_finetune_params(profile: str, params_root: str | Path = "params") -> FinetuneNotebookParams:
    """The profile's 02_finetune params (params/<profile>/02_finetune.yaml), validated: where evaluation
    notebooks look up the runs they evaluate."""
    path = Path(params_root) / profile / "02_finetune.yaml"
    data = read_params_file(path)
    try:
        return from_mapping(FinetuneNotebookParams, {**data, "profile": profile, "params_root": str(params_root)})
    except ParamError as exc:
        raise ParamError(f"{path}: {exc}") from None



def run_names(profile: str, params_root: str | Path = "params") -> tuple[list[str], list[str]]:
    """(HF runs, OpenAI runs) that the profile's 02_finetune params define."""
    params = profile_finetune_params(profile, params_root)
    return list(params.runs), list(params.openai_runs)


@dataclass
class MDQANotebookParams(EvalModelsParams):
    """Parameters of notebooks/03_mdqa.ipynb (models, backend, cache_dir: kvlib.engine.evaluate.EvalModelsParams)."""

    settings: list[str] = dataclasses.field(default_factory=lambda: ["random", "retrieved"])
    num_documents: int = 20
    positions: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10, 15, 20])  # 1-based
    num_questions: int | None = 200  # per position (the same questions at every position); None: all
    question_seed: int = 0
    distractor_seed: int = 0
    max_new_tokens: int = 100  # LitM's
    data_dir: str | None = None  # None: $KVLIB_DATA_DIR or ../shared/data
    # LitM's nq-open-random-documents.jsonl.gz; None: <data>/mdqa/ has it or not (kvlib data fetch mdqa-random)
    random_documents_file: str | None = None
    # pre-registered primary claims (kvlib.report.paper.PrimaryClaim: artifact, model, setting, max_half_width);
    # empty: every claim is judged as before, in one Holm family per figure
    primary: list[paper.PrimaryClaim] = dataclasses.field(default_factory=list)
    # the claims this notebook judges: artifact -> the settings a primary claim of it may name
    PRIMARY_SETTINGS: ClassVar[dict[str, tuple[str, ...]]] = {"fig5": ("random",),
                                                               "fig10": ("retrieved", paper.CONTRAST)}

    def validate(self) -> None:

        super().validate()
        if not self.settings or any(s not in SETTINGS for s in self.settings) or len(set(self.settings)) != len(self.settings):
            fail("settings", f"expected distinct values of {list(SETTINGS)}, got {self.settings!r}")
        most = RETRIEVED_DOCUMENTS if "retrieved" in self.settings else MAX_RANDOM_DOCUMENTS
        if isinstance(self.num_documents, bool) or not 2 <= self.num_documents <= most:
            why = ("the retrieved-distractor data has 20 documents" if "retrieved" in self.settings
                   else "random distractors only")
            fail("num_documents", f"must be in [2, {most}] ({why}), got {self.num_documents}")
        if not self.positions or len(set(self.positions)) != len(self.positions):
            fail("positions", f"expected distinct 1-based gold positions, got {self.positions!r}")
        for p in self.positions:
            if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= self.num_documents:
                fail("positions", f"every position must be an integer in [1, {self.num_documents}], got {p!r}")
        if self.num_questions is not None:
            check_positive("num_questions", self.num_questions)
        check_positive("max_new_tokens", self.max_new_tokens)
        self._check_primary(self.primary, self.PRIMARY_SETTINGS, next(iter(self.models), None))
        for i, claim in enumerate(self.primary):
            allowed = self.PRIMARY_SETTINGS[claim.artifact]
            if claim.benchmark is not None or claim.metric is not None:
                fail(f"primary[{i}].benchmark", "MDQA claims name a setting, not a benchmark or metric")
            if claim.setting not in allowed:
                fail(f"primary[{i}].setting", f"{claim.artifact} is judged in setting {' or '.join(allowed)}, got "
                                              f"{claim.setting!r}")
            needed = ["random", "retrieved"] if claim.setting == paper.CONTRAST else [claim.setting]
            if any(s not in self.settings for s in needed):
                fail(f"primary[{i}].setting", f"{claim.setting} needs settings {needed}; this notebook runs "
                                              f"{self.settings}")



@dataclass
class LongerContextNotebookParams(MDQANotebookParams):
    """Parameters of notebooks/08_longer_context.ipynb (paper Fig. 9): MDQA with random distractors and as many
    documents as the model's context holds, original vs a model finetuned on long key-value prompts. The fields
    are notebook 03's; only random distractors (LitM's retrieved files stop at 20 documents)."""

    settings: list[str] = dataclasses.field(default_factory=lambda: ["random"])
    num_documents: int = 50
    positions: list[int] = dataclasses.field(default_factory=lambda: [1, 10, 25, 40, 50])
    PRIMARY_SETTINGS: ClassVar[dict[str, tuple[str, ...]]] = {"fig9": ("random",)}

    def validate(self) -> None:
        if list(self.settings) != ["random"]:
            fail("settings", f"the longer-context test uses random distractors only, got {self.settings!r}")
        super().validate()


@dataclass
class FLenQANotebookParams(EvalModelsParams):
    """Parameters of notebooks/04_flenqa.ipynb: the models (kvlib.engine.evaluate.EvalModelsParams), the data
    (regenerated by `generation`, or the official release at `official_path`, filtered by the same
    tasks/lengths/paddings/dispersions) and the two prompt styles with their answer budgets."""

    data_dir: str = "runs/data"  # regenerated data goes to <data_dir>/<profile>/flenqa
    source_data_dir: str | None = None  # kvlib data directory with mdqa/ (None: kvlib.engine.data default)
    official_path: str | None = None  # an official FLenQA file: evaluate it instead of regenerating
    official_problems_per_task: int | None = None
    generation: FLenQAConfig = field(default_factory=FLenQAConfig)
    styles: list[Style] = field(default_factory=lambda: list(STYLES))
    max_new_tokens: int = 32  # normal style: a verdict (and maybe a sentence)
    cot_max_new_tokens: int = 256  # chain-of-thought: reasoning, then the verdict
    bootstrap_seed: int = 0
    examples_to_show: int = 2

    def validate(self) -> None:
        super().validate()
        if not self.styles or len(set(self.styles)) != len(self.styles):
            fail("styles", f"must list normal and/or cot once each, got {self.styles}")
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("cot_max_new_tokens", self.cot_max_new_tokens)
        check_positive("examples_to_show", self.examples_to_show, 0)
        if self.official_problems_per_task is not None:
            check_positive("official_problems_per_task", self.official_problems_per_task)
        if self.official_path is not None and not Path(self.official_path).is_file():
            fail("official_path", f"file not found: {self.official_path} (HF dataset alonj/FLenQA)")

    def new_tokens(self, style: str) -> int:
        return self.cot_max_new_tokens if style == "cot" else self.max_new_tokens

    @property
    def out_data_dir(self) -> Path:
        return Path(self.data_dir) / self.profile / "flenqa"


@dataclass
class GeneralBenchmarksNotebookParams(EvalModelsParams):
    """Parameters of notebooks/05_general_benchmarks.ipynb. `models`, `backend`, `cache_dir`: as in every
    evaluation notebook (kvlib.engine.evaluate.EvalModelsParams: label -> {model: <spec>} or {run: <02_finetune
    run>} over shared backend defaults). `baseline`: the label every other model is compared with.
    `tasks`: benchmark name -> TaskParams fields; only the listed benchmarks run. Generation prompts are raw text
    without the chat template (lm-evaluation-harness's default) on local models unless a task asks for
    `prompt_format: chat`; chat API models always get the chat template (kvlib.tasks.general)."""

    data_dir: str | None = None  # None: $KVLIB_DATA_DIR or ../shared/data
    baseline: str = "original"
    tasks: dict[str, TaskParams] = field(default_factory=dict)
    seed: int = 0  # which items the subsample draws (the same for every model)
    # how few-shot examples reach the model when a generation prompt goes through the chat template
    fewshot_format: FewshotFormat = "multiturn"
    n_boot: int = 2000
    examples_to_show: int = 2
    # labels of local HF models to run again through lm-evaluation-harness on the same items (kvlib.tasks.harness)
    harness_crosscheck: list[str] = field(default_factory=list)
    harness_dir: str = "runs/harness"  # where the harness's task files and local data go
    # pre-registered primary claims (kvlib.report.paper.PrimaryClaim: artifact table1, model, benchmark, metric
    # (default its headline), max_half_width); empty: every claim is judged as before, in one Holm family
    primary: list[paper.PrimaryClaim] = field(default_factory=list)

    def validate(self) -> None:

        configs = self.model_configs()  # every model's backend, checked before any work
        for label in self.harness_crosscheck:
            if label not in configs:
                fail("harness_crosscheck", f"{label!r} is not one of the models {list(configs)}")
            if configs[label].kind == "openai":
                fail("harness_crosscheck", f"{label!r} is an {configs[label].kind} backend; the cross-check scores "
                                           f"a local model (loaded in transformers whatever its engine)")
        if self.harness_crosscheck:

            if not harness.available():
                fail("harness_crosscheck", 'needs lm-evaluation-harness: pip install -e ".[harness]"')
            unsupported = [n for n, s in self.tasks.items() if s.n_shot is not None and s.n_shot != TASKS[n].n_shot]
            if unsupported:
                fail("harness_crosscheck", f"the harness runs its own shot counts; {unsupported} set n_shot")
        if self.baseline not in self.models:
            fail("baseline", f"must be one of the models {list(self.models)}, got {self.baseline!r}")
        check_seed_groups(self.seed_groups, list(configs), self.baseline)
        if not self.tasks:
            fail("tasks", f"at least one benchmark is required; known: {', '.join(TASKS)}")
        for name, settings in self.tasks.items():
            settings.check_against(task_spec(name), f"tasks.{name}")
            if settings.variant == "loglikelihood":
                for label, config in configs.items():
                    if config.kind == "openai":
                        fail(f"tasks.{name}.variant", f"model {label!r} is a {config.kind} backend, which has no "
                                                      f"log-likelihoods; use auto or generate")
            if settings.prompt_format == "raw":
                for label, config in configs.items():
                    if config.kind == "openai":
                        fail(f"tasks.{name}.prompt_format", f"model {label!r} is a {config.kind} backend, a chat API "
                                                            f"that cannot send text without its chat template; use "
                                                            f"auto or chat")
        check_positive("n_boot", self.n_boot, 100)
        check_positive("examples_to_show", self.examples_to_show, 0)
        self._check_primary(self.primary, {"table1": ()}, self.baseline)
        for i, claim in enumerate(self.primary):
            if claim.setting is not None:
                fail(f"primary[{i}].setting", "Table 1 claims name a benchmark, not an MDQA setting")
            if claim.benchmark not in self.tasks:
                fail(f"primary[{i}].benchmark", f"{claim.benchmark!r} is not one of this notebook's tasks "
                                                f"{list(self.tasks)}")
            metrics = {m for ms in TASKS[claim.benchmark].metrics.values() for m in ms} - {"parsed"}
            if claim.metric is not None and claim.metric not in metrics:
                fail(f"primary[{i}].metric", f"{claim.benchmark} is scored on {sorted(metrics)}, got {claim.metric!r}")

    def raw_text(self) -> bool | None:
        """Whether the models can be sent raw text (no chat template): True when all are local models, False when
        all are chat APIs (kind openai), None for a mix (for the conventions table)."""
        kinds = {config.kind == "openai" for config in self.model_configs().values()}
        return None if len(kinds) > 1 else not (kinds.pop() if kinds else False)

    def harness_model(self, label: str) -> BackendConfig:
        """The model `label` as lm-evaluation-harness's cross-check loads it: in transformers (kind hf), whichever
        engine (vLLM with kind auto or vllm) answered the notebook's own evaluation."""
        return dataclasses.replace(self.model_configs()[label], kind="hf")

    def task_list(self) -> list[tuple[TaskSpec, TaskParams]]:
        """The selected benchmarks in TASKS order (so tables read the same in every profile)."""
        return [(spec, self.tasks[name]) for name, spec in TASKS.items() if name in self.tasks]


@dataclass
class InDistributionParams:
    """Accuracy on a synthetic dataset's eval split by gold-dictionary position."""

    dataset: str = ""  # a dataset of the profile's 01_synthetic_data params, or
    run: str = ""  # a run of notebook 02 among the models: the dataset it trains on (`dataset: sweep`: the sweep's)
    eval_samples: int = 60
    position_bins: int = 5  # gold positions grouped into this many equal-width bins



@dataclass
class LitMKVParams:
    """LitM's key-value retrieval (UUID pairs), gold pair at each position."""

    num_keys: int = 75  # which LitM file: 75, 140 (or 300 if you have it)
    num_pairs: int | None = None  # gold + the first num_pairs-1 other pairs; None: all num_keys
    positions: list[int] = field(default_factory=lambda: [1, 25, 50, 75])
    num_examples: int = 20
    seed: int = 0
    max_new_tokens: int = 48



@dataclass
class KVGridParams:
    """Beyond the paper: synthetic task accuracy on a grid of context length x gold position."""

    dataset: str = ""  # whose task/template/value ranges (and seed) the grid reuses, or
    run: str = ""  # a run of notebook 02 among the models: the dataset it trains on, whose prompts the grid avoids
    num_dicts: list[int] = field(default_factory=lambda: [10, 40, 80])
    relative_positions: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples_per_cell: int = 8
    max_tokens: int = 8000  # prompt budget of the grid (the embedded model's context is 8192)



@dataclass
class KVRetrievalNotebookParams(EvalModelsParams):
    """Parameters of notebooks/07_kv_retrieval.ipynb; a section set to null is skipped."""

    in_distribution: InDistributionParams | None = field(default_factory=InDistributionParams)
    litm: LitMKVParams | None = field(default_factory=LitMKVParams)
    grid: KVGridParams | None = field(default_factory=KVGridParams)
    max_new_tokens: int = 48  # synthetic answers ("The value of key K is V and it is in Dictionary [D].")
    data_dir: str | None = None

    def validate(self) -> None:

        super().validate()
        check_positive("max_new_tokens", self.max_new_tokens)
        if self.in_distribution is not None:
            s = self.in_distribution
            self._check_source("in_distribution", s)
            check_positive("in_distribution.eval_samples", s.eval_samples)
            check_positive("in_distribution.position_bins", s.position_bins)
        if self.litm is not None:
            s = self.litm
            if s.num_keys not in (75, 140, 300):
                fail("litm.num_keys", f"LitM's files have 75, 140 or 300 keys, got {s.num_keys}")
            total = s.num_keys if s.num_pairs is None else s.num_pairs
            if not 2 <= total <= s.num_keys:
                fail("litm.num_pairs", f"must be in [2, {s.num_keys}], got {s.num_pairs}")
            if not s.positions or any(isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= total
                                      for p in s.positions):
                fail("litm.positions", f"1-based positions in [1, {total}] required, got {s.positions}")
            check_positive("litm.num_examples", s.num_examples)
            check_positive("litm.max_new_tokens", s.max_new_tokens)
        if self.grid is not None:
            s = self.grid
            self._check_source("grid", s)
            if not s.num_dicts or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 for d in s.num_dicts):
                fail("grid.num_dicts", f"integers >= 2 required, got {s.num_dicts}")
            if not s.relative_positions or any(not 0 <= r <= 1 for r in s.relative_positions):
                fail("grid.relative_positions", f"fractions in [0, 1] required, got {s.relative_positions}")
            check_positive("grid.samples_per_cell", s.samples_per_cell)
            check_positive("grid.max_tokens", s.max_tokens)

    def _check_source(self, section: str, s: Any) -> None:
        if bool(s.run) == bool(s.dataset):
            fail(section, f"give its dataset or the run whose dataset it takes, one of them (dataset {s.dataset!r}, "
                          f"run {s.run!r})")
        if s.run:
            hf_runs, _ = run_names(self.profile, self.params_root)  # an OpenAI run trains on no dataset of ours
            runs = [c.run for c in self.model_configs().values() if c.run in hf_runs]
            if s.run not in runs:
                fail(f"{section}.run", f"{s.run!r} is not a run among the models ({', '.join(runs) or 'none'}; HF "
                                       f"runs of notebook 02): the dataset a run trains on is known once notebook 02 "
                                       f"(its sweep) has trained it")
        else:
            _dataset_of(self.profile, self.params_root, f"{section}.dataset", s.dataset, profile_dataset)

    def section_dataset(self, section: str) -> str:
        """The dataset section `in_distribution` or `grid` draws on: its `dataset`, or the one its `run` trains on.
        For a run that takes its dataset from notebook 02's sweep, that is the sweep's pick once the sweep has run
        (the notebook's learned gate runs it first) and, before, the longest candidate (what a planner costs)."""
        s = getattr(self, section)
        return profile_finetune_params(self.profile, self.params_root).jobs()[s.run].dataset if s.run else s.dataset

    def grid_config(self):
        """The generation config of the grid: the dataset's, with the grid's prompt budget."""

        cfg, _ = profile_dataset(self.profile, self.section_dataset("grid"), Path(self.params_root))
        return dataclasses.replace(cfg, max_tokens=self.grid.max_tokens)



def _dataset_of(profile: str, params_root: str, where: str, name: str, profile_dataset) -> None:
    try:
        profile_dataset(profile, name, Path(params_root))
    except ParamError as exc:
        raise ParamError(f"{where}: {exc}") from None


# the rows of the paper's Table 2 (params/paper_reference.yaml via kvlib.report.paper, Mistral-7B-Instruct-v0.1) for each kind
PAPER_MODEL = "Mistral-7B-Instruct-v0.1"



PAPER_ROWS = {"multidocqa": "MultidocQA", "in2": "IN2", "niah": "needle-in-a-haystack"}



_COMMON = ("profile", "results_dir", "params_root", "models", "backend", "cache_dir")



_SET_BY_MATCH = ("token_total",)  # read from the matched synthetic set (matched_config)



def baseline_slug(label: str) -> str:
    """A baseline label as a directory name (its data and model folders)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")



@dataclass
class BaselinesNotebookParams(EvalModelsParams):
    """Parameters of notebooks/06_baselines.ipynb.

    `models`: the models the baselines are compared with (kvlib.engine.evaluate.EvalModelsParams: the original and the
    synthetic-data runs of notebook 02); `original`: the label every delta is taken against.
    `baselines`: label -> {kind: mdqa|multidocqa|in2|niah, other BaselineConfig fields}; each set is
    token-matched to the train split of the dataset of `match` (a run of the profile's 02_finetune params) and
    trained with that run's recipe (only train_file and out_dir change). Sections `mdqa`, `flenqa`, `general`
    take the task fields of notebooks 03, 04 and 05 (validated by those notebooks' params classes); null skips
    a section. `paper_rows`: label of a synthetic model -> the Table 2 row it corresponds to (e.g. "key-value,
    with template"); baselines map by kind."""

    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    match: str | None = None
    original: str = "original"
    data_dir: str = "runs/data"  # baseline sets: <data_dir>/<profile>/baselines/<label>; FLenQA: .../flenqa
    models_dir: str = "runs/models"  # baseline runs: <models_dir>/<profile>/baselines/<label>-<data sha256[:8]>
    source_data_dir: str | None = None  # the kvlib data directory (None: $KVLIB_DATA_DIR or ../shared/data)
    mdqa: dict[str, Any] | None = None
    flenqa: dict[str, Any] | None = None
    general: dict[str, Any] | None = None
    paper_rows: dict[str, str] = field(default_factory=dict)
    bootstrap_seed: int = 0

    def validate(self) -> None:
        configs = self.model_configs()
        if self.original not in configs:
            fail("original", f"must be one of the models {list(configs)}, got {self.original!r}")
        if self.seed_groups:  # each baseline is one training run, compared with one synthetic run (Table 2)
            fail("seed_groups", "notebook 06 compares single runs and does not average seeds; remove seed_groups")
        if self.baselines and self.match is None:
            fail("match", f"required with baselines: a run of {self.params_root}/{self.profile}/02_finetune.yaml "
                          f"whose dataset sets the token budget and whose recipe every baseline reuses")
        if self.match is not None:
            self.match_job()
        slugs = {}
        for label in self.baselines:
            if label in configs:
                fail(f"baselines.{label}", f"label already used by models {list(configs)}")
            slug = baseline_slug(label) if isinstance(label, str) else ""
            if not slug or slug in slugs:
                fail(f"baselines.{label}", f"labels must give distinct directory names, got {label!r}"
                                           + (f" (same as {slugs[slug]!r})" if slug in slugs else ""))
            slugs[slug] = label
            self.baseline_config(label)
        if self.baselines:
            self.baseline_backend("placeholder")
        for label, row in self.paper_rows.items():
            if label not in configs:
                fail(f"paper_rows.{label}", f"not one of the models {list(configs)} (baselines map by kind)")
            if f"{PAPER_MODEL}: {row}" not in table2_reference_rows():
                known = [k.split(": ", 1)[1] for k in table2_reference_rows() if k.startswith(PAPER_MODEL)]
                fail(f"paper_rows.{label}", f"unknown Table 2 row {row!r}; known: {known}")
        self.mdqa_params(), self.flenqa_params(), self.general_params()

    # -- baselines

    def finetune_launcher(self) -> LauncherConfig | None:
        """How the baselines train: the launcher of the profile's 02_finetune params (they reuse `match`'s recipe)."""
        return profile_finetune_params(self.profile, self.params_root).launcher

    def match_job(self):
        """The 02_finetune job named by `match` (its dataset and TrainConfig)."""

        jobs = profile_finetune_params(self.profile, self.params_root).jobs()
        if self.match not in jobs:
            fail("match", f"{self.match!r} is not a (local) run of {self.params_root}/{self.profile}/02_finetune.yaml "
                          f"(runs: {', '.join(jobs) or 'none'})")
        return jobs[self.match]

    def baseline_config(self, label: str) -> BaselineConfig:
        """The baseline's BaselineConfig before matching: tokenizer defaults to the matched dataset's, data_dir
        to source_data_dir."""

        spec = self.baselines[label]
        if not isinstance(spec, Mapping) or "kind" not in spec:
            fail(f"baselines.{label}", f"expected a mapping with kind ({'|'.join(KINDS)}), got {spec!r}")
        for key in _SET_BY_MATCH:
            if key in spec:
                fail(f"baselines.{label}.{key}", f"is set from the matched synthetic set ({self.match!r})")
        job = self.match_job()
        defaults = {"tokenizer": job.data_config.tokenizer, "data_dir": self.source_data_dir}
        if spec["kind"] == "in2":  # matching replaces sample_tokens; until then leave room for the segments
            low = 4 * spec.get("segment_tokens", BaselineConfig.segment_tokens)
            defaults["sample_tokens"] = [low, max(low, BaselineConfig.sample_tokens[1])]
        return from_mapping(BaselineConfig, {**defaults, **spec}, f"baselines.{label}")

    def baseline_backend(self, model_dir: str):
        """The BackendConfig of a trained baseline: its model directory over the shared backend defaults."""

        config = from_mapping(BackendConfig, {**self.backend, "model": model_dir}, "backend")
        if config.kind == "openai":
            fail("backend.kind", "baselines are trained locally and evaluated as local models (hf, vllm or auto); "
                                 "set kind per model in models instead")
        return config

    def baseline_dir(self, label: str) -> Path:
        return Path(self.data_dir) / self.profile / "baselines" / baseline_slug(label)

    @property
    def flenqa_data_dir(self) -> Path:
        return Path(self.data_dir) / self.profile / "baselines" / "flenqa"

    # -- sections: notebooks 03, 04, 05's params classes validate them

    def _section(self, name: str, cls: type, defaults: dict):

        data = getattr(self, name)
        if data is None:
            return None
        if not isinstance(data, Mapping):
            fail(name, f"expected a mapping of the task fields of {cls.__name__}, or null to skip; got {data!r}")
        for key in _COMMON:
            if key in data:
                fail(f"{name}.{key}", "is set once, at the top level of this notebook's params")
        if "primary" in data:
            fail(f"{name}.primary", "notebook 06 judges Fig. 8 and Table 2; pre-register Figs. 5 and 10 and Table 1 "
                                    "in the params of notebooks 03 and 05")
        common = {k: getattr(self, k) for k in _COMMON}
        return from_mapping(cls, {**common, **defaults, **data}, name)

    def mdqa_params(self):

        return self._section("mdqa", MDQANotebookParams, {"data_dir": self.source_data_dir})

    def flenqa_params(self):

        return self._section("flenqa", FLenQANotebookParams, {"source_data_dir": self.source_data_dir})

    def general_params(self):

        params = self._section("general", GeneralBenchmarksNotebookParams,
                               {"data_dir": self.source_data_dir, "baseline": self.original})
        if params is not None and params.baseline != self.original:
            fail("general.baseline", f"deltas are taken against original ({self.original!r}); remove it")
        if params is not None and params.harness_crosscheck:
            fail("general.harness_crosscheck", "notebook 05 runs the harness cross-check; remove it here")
        return params

    def paper_row(self, label: str) -> str | None:
        """The Table 2 row (without the model prefix) a model or baseline corresponds to, if any."""
        if label in self.baselines:
            return PAPER_ROWS.get(self.baselines[label]["kind"])
        return self.paper_rows.get(label)



def table2_reference_rows() -> dict:
    """The paper's general-benchmark rows (Table 2 among them), keyed "<model>: <row>"."""
    return paper.load().general_scores()


# ------------------------------------------------------------------------------------------ the registry

# Notebook name -> its params class, in the order `kvlib reproduce` runs them. Adding a notebook means adding its
# file under notebooks/, a params file per profile and its class here.
NOTEBOOKS: dict[str, type] = {
    "01_synthetic_data": SyntheticDataNotebookParams,
    "02_finetune": FinetuneNotebookParams,
    "03_mdqa": MDQANotebookParams,
    "04_flenqa": FLenQANotebookParams,
    "05_general_benchmarks": GeneralBenchmarksNotebookParams,
    "06_baselines": BaselinesNotebookParams,
    "07_kv_retrieval": KVRetrievalNotebookParams,
    "08_longer_context": LongerContextNotebookParams,
}
SYNTHETIC_DATA, FINETUNE = "01_synthetic_data", "02_finetune"  # the notebooks later ones refer to by role

INJECTED = "kvlib_params"  # the one variable of every notebook's `parameters` cell
INTERACTIVE_PROFILE = "quick"  # what a notebook opened as it is runs (minutes per notebook)
INTERACTIVE_RESULTS = Path("results") / "interactive"  # git-ignored: where such a run writes
STAGING = ".staging"  # results/<profile>/.staging/<notebook>/: a pipeline run's outputs until it succeeds
REPORT_COLUMN_WIDTH = 300  # characters of a table cell a notebook shows (pandas cuts at 50 by default)


def repo_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder at or above `start` (default: the working directory) holding
    params/ and notebooks/ (the repository, or a folder made by `kvlib init`), else the checkout kvlib runs from
    (kvlib.engine.resources)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params").is_dir() and (folder / "notebooks").is_dir():
            return folder
    return resources.CHECKOUT


def notebook_class(name: str) -> type:
    if name not in NOTEBOOKS:
        raise ParamError(f"notebook: unknown {name!r}; known: {', '.join(NOTEBOOKS)}")
    return NOTEBOOKS[name]


def _committed_results(results_dir: Path, root: Path) -> str | None:
    """The committed profile whose results `results_dir` would write into directly (not through staging)."""
    try:
        parts = (root / results_dir).resolve().relative_to((root / "results").resolve()).parts
    except ValueError:
        return None
    if not parts or parts[0] == INTERACTIVE_RESULTS.name or STAGING in parts:
        return None
    return parts[0] if (root / "params" / parts[0]).is_dir() else None


def _param_text(value: Any) -> str:
    """A parameter's value for the params table: a mapping of mappings (models, datasets, runs) one entry per
    line, other containers as compact JSON."""
    if isinstance(value, Mapping) and any(isinstance(v, (Mapping, list)) for v in value.values()):
        return "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False, default=str)}" for k, v in value.items())
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "" if value is None else str(value)


def params_table(params: Any):
    """The parameters a notebook runs with (its params object as `start` returned it: the profile's values with
    every default filled in), one row per field, nested values as JSON (`_param_text`): what a report shows once, after
    `start`. The results folder is shown where the run publishes it (results/<profile>), not the staging folder
    the notebook writes into until it succeeds."""
    import pandas as pd

    rows = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        if isinstance(value, Mapping):
            value = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
        if f.name == "results_dir" and STAGING in Path(str(value)).parts:
            value = Path(*Path(str(value)).parts[:Path(str(value)).parts.index(STAGING)]).as_posix()
        rows.append({"parameter": f.name, "value": _param_text(value)})
    return pd.DataFrame(rows)


def start(name: str, injected: Mapping[str, Any] | None, namespace: Mapping[str, Any] | None = None):
    """The first call of notebook `name`: its params object from the mapping papermill injected (`kvlib_params`,
    already validated by `kvlib reproduce`), or, when None (the notebook opened as it is), the `quick` profile's
    params writing into results/interactive/. Paths resolve from the repository root whatever the kernel's working
    directory: the process moves there. `namespace` (the notebook's globals()) catches a params YAML injected key
    by key (`papermill -f`), which is refused."""
    cls = notebook_class(name)
    root = repo_root()
    os.chdir(root)
    # tqdm's progress bars fall back to text in a kernel without ipywidgets, warning once per process; the runner
    # strips the bars from the report (kvlib.pipeline.reproduce), and the warning says nothing to its reader
    warnings.filterwarnings("ignore", message="IProgress not found")
    import pandas as pd

    # a table's text (a verdict with its reason, an interval method) is shown whole, not cut at 50 characters
    pd.set_option("display.max_colwidth", REPORT_COLUMN_WIDTH)
    stray = sorted(k for k, v in (namespace or {}).items()
                   if k in {f.name for f in dataclasses.fields(cls)} and not isinstance(v, types.ModuleType))
    if stray:
        raise ParamError(f"{name}: params injected one by one ({', '.join(stray)}): a params YAML given to papermill "
                         f"with -f is not run by hand; use `kvlib reproduce --profile <profile> --only {name}`")
    if injected is None:
        path = Path("params") / INTERACTIVE_PROFILE / f"{name}.yaml"
        data = {**load_yaml(path), "profile": INTERACTIVE_PROFILE,
                "results_dir": (INTERACTIVE_RESULTS / INTERACTIVE_PROFILE).as_posix()}
        declared = {f.name for f in dataclasses.fields(cls)}
        try:
            params = from_mapping(cls, {k: v for k, v in data.items() if k in declared})
        except ParamError as exc:
            raise ParamError(f"{path}: {exc}") from None
    else:
        if not isinstance(injected, Mapping):
            raise ParamError(f"{name}: {INJECTED} must be a mapping of params, got {type(injected).__name__}")
        profile = _committed_results(Path(str(injected.get("results_dir", ""))), root)
        if profile is not None:
            raise ParamError(f"{name}: results_dir {injected['results_dir']!r} is a committed profile's results, "
                             f"which only `kvlib reproduce --profile {profile} --only {name}` replaces (as a whole, "
                             f"on success)")
        params = from_mapping(cls, injected, check=False)
    # what this run's work costs, measured where it is done, goes with its results (the planner's rates)
    meter.point_at(Path(params.results_dir) / name / meter.COST_FILE)
    return params
