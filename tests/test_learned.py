"""Training that matches the test: prompt lengths measured against MDQA's (kvlib.tasks.prompt_lengths), notebook 02's
training-length x learning-rate x epochs sweep (kvlib.pipeline.sweep, FinetuneNotebookParams.sweep), and the gate that lets only
finetunes that learned their own task into the evaluation notebooks (kvlib.pipeline.runs.LearnedGate)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from kvlib.engine import train
from kvlib.engine.config import ParamError, from_mapping
from kvlib.engine.data import _OFFICIAL_20DOCS
from kvlib.engine.io import file_sha256, files_sha256
from kvlib.pipeline import notebooks, runs, sweep
from kvlib.report import paper
from kvlib.tasks import mdqa, prompt_lengths
from kvlib.tasks.mdqa import Document, MDQAExample
from kvlib.tasks.synthetic import GenerationConfig, ensure_dataset, generate

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ prompt lengths


def _mdqa_data_dir(root: Path, words: list[int]) -> Path:
    """A data directory holding LitM's oracle file and an official 20-document file of len(words) questions, question
    i's documents `words[i]` words long each."""
    oracle, retrieved = [], []
    for i, n in enumerate(words):
        question = f"who wrote book number {i}"
        gold = Document(f"Gold {i}", " ".join(["answer"] * n), f"g{i}", True)
        docs = [gold] + [Document(f"Other {j}", " ".join(["filler"] * n), f"d{i}-{j}", False) for j in range(19)]
        qid = mdqa.question_id(question)
        oracle.append(MDQAExample(question, [f"Author {i}"], [gold], 0, qid))
        retrieved.append(MDQAExample(question, [f"Author {i}"], docs, 0, qid))
    mdqa.write_mdqa(oracle, root / "mdqa" / "qa_data" / "nq-open-oracle.jsonl.gz")
    mdqa.write_mdqa(retrieved, root / "mdqa" / _OFFICIAL_20DOCS.format(0))
    return root


def test_prompt_lengths_count_what_the_model_reads(embedded_checkpoint, tmp_path):
    """MDQA and synthetic prompts are counted as the model reads them: its chat template around the prompt (the same
    template tokens for every prompt), on the questions and training samples the notebooks use."""
    from kvlib.engine.models import load_token_counter, load_tokenizer

    model = embedded_checkpoint
    data_dir = _mdqa_data_dir(tmp_path, [5, 40, 12])
    lengths, source = prompt_lengths.mdqa_prompt_lengths(model, data_dir=data_dir)
    assert "3 of 2655 questions" in source and len(lengths) == 3
    examples = mdqa.build_eval_sets(["retrieved"], 20, None, 0, 0, data_dir)["retrieved"].examples
    prompts = [mdqa.format_qa_prompt(e.question, e.documents) for e in examples]
    raw = load_token_counter(model).count(prompts)
    overhead = {n - r for n, r in zip(lengths, raw)}
    assert len(overhead) == 1 and overhead.pop() > 0, "the chat template adds the same tokens to every prompt"
    tokenizer = load_tokenizer(model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompts[1]}], add_generation_prompt=True,
                                        tokenize=True)
    assert lengths[1] == len(ids["input_ids"] if hasattr(ids, "keys") else ids) == max(lengths)

    short, long_ = (GenerationConfig(num_dicts=d, n_train=6, n_eval=0, max_tokens=2000, tokenizer=model)
                    for d in (3, 12))
    counted = prompt_lengths.synthetic_prompt_lengths(short, model)
    assert counted == [n + min(lengths) - min(raw) for n in load_token_counter(model).count(
        [s.prompt for s in generate(short)["train"]])]
    rows = prompt_lengths.length_table({"short": short, "long": long_}, model, data_dir=data_dir)
    assert [r["prompts"] for r in rows] == ["MDQA, 20 documents (retrieved distractors)", "short", "long"]
    assert rows[0]["median"] == sorted(lengths)[1] and rows[0]["median_vs_mdqa"] == 1.0
    assert rows[1]["n"] == 6 and rows[1]["median"] < rows[2]["median"]
    assert rows[2]["median_vs_mdqa"] == round(rows[2]["median"] / rows[0]["median"], 3)
    text = prompt_lengths.format_length_table(rows, model)
    assert "long: num_dicts 12, max_tokens 2000: n 6, median" in text


def test_prompt_lengths_command(embedded_checkpoint, tmp_path, capsys):
    from kvlib.pipeline import cli

    data_dir = _mdqa_data_dir(tmp_path, [5, 9])
    assert cli.main(["prompt-lengths", "--num-dicts", "3", "--samples", "4", "--data-dir", str(data_dir),
                     "--model", embedded_checkpoint]) == 0
    out = capsys.readouterr().out
    assert "MDQA, 20 documents (retrieved distractors): n 2, median" in out
    assert "simple-template-3dicts: num_dicts 3, max_tokens 8192: n 4, median" in out
    assert cli.main(["prompt-lengths", "--dataset", "x"]) == 2
    assert "dataset: names a dataset of a profile; give --profile too" in capsys.readouterr().err
    assert cli.main(["prompt-lengths", "--profile", "cpu", "--dataset", "nope", "--params-dir",
                     str(ROOT / "params")]) == 2
    assert "dataset: nope not in" in capsys.readouterr().err


def test_length_stats_edges():
    assert prompt_lengths.length_stats([]) == {"n": 0, "min": None, "median": None, "mean": None, "max": None}
    assert prompt_lengths.length_stats([7]) == {"n": 1, "min": 7, "median": 7, "mean": 7.0, "max": 7}
    assert prompt_lengths.length_stats([4, 1, 3, 2])["median"] == 2.5


def test_cpu_training_length_is_swept_below_the_mdqa_length_as_stated():
    """The cpu profile's main finetune takes its training length from notebook 02's sweep; each candidate pairs the
    trials' dataset with the run's at one length, below the MDQA length (69 dictionaries), as its comment states; the
    numbers there come from `kvlib prompt-lengths --profile cpu` (run by hand: it tokenizes thousands of prompts)."""
    params = yaml.safe_load((ROOT / "params" / "cpu" / "01_synthetic_data.yaml").read_text())["datasets"]
    finetune = yaml.safe_load((ROOT / "params" / "cpu" / "02_finetune.yaml").read_text())
    assert finetune["runs"]["simple-template-s0"]["dataset"] == "sweep"
    candidates = finetune["sweep"]["datasets"]
    lengths = [params[trial]["num_dicts"] for trial in candidates]
    assert len(set(lengths)) == len(lengths) >= 2 and max(lengths) < 69
    for trial, run in candidates.items():
        assert params[trial]["num_dicts"] == params[run]["num_dicts"] and params[trial]["seed"] != params[run]["seed"]
        assert params[run]["n_train"] == 350  # the paper's count, behind every primary claim
    P = notebooks.profile_finetune_params("cpu", ROOT / "params")
    assert [j.dataset for j in P.sweep_jobs().values()] == [t for t in candidates for _ in finetune["sweep"]["learning_rates"]]
    comment = (ROOT / "params" / "cpu" / "01_synthetic_data.yaml").read_text()
    assert "`kvlib prompt-lengths --profile cpu`" in comment and "median 3167 tokens" in comment
    assert "median 1660 tokens" in comment and "median 992" in comment


# ------------------------------------------------------------------ the sweep's rule


def _trial(lr, epochs, value, steps=10, n=40, dataset="d", num_dicts=20):
    return {"trial": sweep.trial_name(dataset, lr, epochs), "dataset": dataset, "num_dicts": num_dicts,
            "learning_rate": lr, "epochs": epochs, "steps": steps * epochs, "n": n, "value": value}


def test_sweep_picks_the_most_accurate_trial_that_learned():
    trials = [_trial(1e-5, 1, 0.2), _trial(1e-4, 1, 0.7), _trial(3e-4, 2, 0.9), _trial(3e-4, 1, 0.55)]
    outcome = sweep.select(trials, 0.5)
    assert (outcome["winner"], outcome["learning_rate"], outcome["epochs"]) == ("d-lr0.0003-ep2", 3e-4, 2)
    assert "90.0% of 40" in outcome["reason"]


def test_sweep_ties_go_to_the_least_training():
    # equal accuracy: the smaller learning rate x steps (1e-4 x 20 < 3e-4 x 10), then the smaller learning rate
    tied = [_trial(3e-4, 1, 0.8), _trial(1e-4, 2, 0.8), _trial(3e-4, 2, 0.8)]
    assert sweep.select(tied, 0.5)["winner"] == "d-lr0.0001-ep2"
    same_product = [_trial(2e-4, 1, 0.8), _trial(1e-4, 2, 0.8)]
    assert sweep.select(same_product, 0.5)["winner"] == "d-lr0.0001-ep2"
    assert sweep.select(list(reversed(tied)), 0.5) == sweep.select(tied, 0.5)  # order-free


def test_sweep_without_a_trial_that_learned_has_no_winner():
    zero = [_trial(1e-5, 1, 0.0), _trial(1e-4, 2, 0.0)]
    outcome = sweep.select(zero, 0.5)
    assert outcome["winner"] is None and outcome["learning_rate"] is None and outcome["epochs"] is None
    assert outcome["reason"] == "no sweep trial learned its task: the best held-out value accuracy, 0.0% of 40 " \
                                "(d-lr1e-05-ep1), is 0"
    assert sweep.select(zero, 0.0)["winner"] is None  # even where every finetune may enter the evaluations
    below = sweep.select([_trial(1e-5, 1, 0.1), _trial(1e-4, 2, 0.45)], 0.5)
    assert below["winner"] is None and "45.0% of 40 (d-lr0.0001-ep2), is below 50%" in below["reason"]
    # reaching the threshold is learning it; one trial of one item is a sweep too
    assert sweep.select([_trial(1e-4, 1, 0.5)], 0.5)["winner"] == "d-lr0.0001-ep1"
    assert sweep.select([_trial(1e-4, 1, 1.0, n=1)], 0.5)["winner"] == "d-lr0.0001-ep1"
    with pytest.raises(ValueError, match="at least one trial"):
        sweep.select([], 0.5)


def test_sweep_takes_the_longest_training_length_that_learned():
    """Length comes first: a shorter length wins only where no trial at a longer one learned, however much more
    accurate it is; within the length, the rule as before."""
    long, short = dict(dataset="long", num_dicts=35), dict(dataset="short", num_dicts=20)
    trials = [_trial(1e-4, 1, 0.55, **long), _trial(3e-4, 1, 0.6, **long), _trial(1e-4, 1, 0.95, **short)]
    outcome = sweep.select(trials, 0.5)
    assert (outcome["winner"], outcome["dataset"], outcome["num_dicts"]) == ("long-lr0.0003-ep1", "long", 35)
    assert "60.0% of 40 at 35 dictionaries" in outcome["reason"]
    failed_long = [_trial(1e-4, 1, 0.45, **long), _trial(3e-4, 1, 0.0, **long), _trial(1e-4, 1, 0.5, **short)]
    assert sweep.select(failed_long, 0.5)["dataset"] == "short"
    nobody = sweep.select([_trial(1e-4, 1, 0.45, **long), _trial(1e-4, 1, 0.3, **short)], 0.5)
    assert nobody["winner"] is None and nobody["dataset"] is None and "45.0% of 40 (long-lr0.0001-ep1)" in nobody["reason"]


# ------------------------------------------------------------------ params: sweep section, `sweep` values


def _profile(tmp_path: Path, runs_spec: dict, sweep_spec: dict | None = None, threshold: float = 0.5) -> Path:
    """A params root with profile `t`: three tiny datasets (01) and notebook 02's runs (and sweep)."""
    root = tmp_path / "params"
    (root / "t").mkdir(parents=True, exist_ok=True)
    shape = {"num_dicts": 3, "n_train": 4, "n_eval": 3, "max_tokens": 400}
    data = {"data_dir": str(tmp_path / "data"),
            "datasets": {"a": {**shape, "seed": 0}, "b": {**shape, "seed": 1}, "c": {**shape, "seed": 2},
                         "tune": {**shape, "seed": 3}, "none": {**shape, "n_eval": 0},
                         "a5": {**shape, "num_dicts": 5, "seed": 0}, "tune5": {**shape, "num_dicts": 5, "seed": 3}}}
    finetune = {"models_dir": str(tmp_path / "models"), "runs": runs_spec, "eval_samples": 3,
                "learned_threshold": threshold}
    if sweep_spec is not None:
        finetune["sweep"] = sweep_spec
    (root / "t" / "01_synthetic_data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (root / "t" / "02_finetune.yaml").write_text(yaml.safe_dump(finetune, sort_keys=False))
    return root


def _finetune(root: Path) -> notebooks.FinetuneNotebookParams:
    return notebooks.profile_finetune_params("t", root)


SWEPT = {"learning_rate": "sweep", "epochs": "sweep", "gradient_accumulation_steps": 4}
GRID = {"datasets": {"tune": "a"}, "learning_rates": [1e-4, 3e-4], "epochs": [1, 2], "train": {"gradient_accumulation_steps": 4}}


@pytest.mark.parametrize("runs_spec, sweep_spec, message", [
    ({"r": {"dataset": "a", "learning_rate": "sweep"}}, None,
     r"runs\.r\.learning_rate: is 'sweep' but this profile has no sweep section"),
    ({"r": {"dataset": "a", "seed": "sweep"}}, GRID, r"runs\.r\.seed: only dataset and learning_rate and epochs"),
    ({"r": {"dataset": "sweep"}}, None, r"runs\.r\.dataset: is 'sweep' but this profile has no sweep section"),
    ({"r": {"dataset": "a"}}, {**GRID, "learning_rates": []}, r"sweep\.learning_rates: expected a list of distinct"),
    ({"r": {"dataset": "a"}}, {**GRID, "learning_rates": [1e-4, 1e-4]}, r"sweep\.learning_rates: expected"),
    ({"r": {"dataset": "a"}}, {**GRID, "learning_rates": [-1e-4]}, r"sweep\.learning_rates: expected"),
    ({"r": {"dataset": "a"}}, {**GRID, "epochs": [0, 1]}, r"sweep\.epochs: expected a list of distinct numbers > 0"),
    ({"r": {"dataset": "a"}}, {**GRID, "learning_rates": ["fast"]}, r"sweep\.learning_rates\[0\]: expected a number"),
    ({"r": {"dataset": "a"}}, {**GRID, "train": {"max_steps": 3}}, r"sweep\.train\.max_steps: would replace"),
    ({"r": {"dataset": "a"}}, {**GRID, "train": {"learning_rate": 1e-3}}, r"sweep\.train\.learning_rate: is the"),
    ({"r": {"dataset": "a"}}, {**GRID, "train": {"epoks": 1}}, r"sweep\.train\.epoks: unknown parameter"),
    ({"r": {"dataset": "a"}}, {**GRID, "datasets": {"nope": "a"}}, r"sweep\.datasets\.dataset: 'nope' is not defined"),
    ({"r": {"dataset": "a"}}, {**GRID, "datasets": {"tune": "nope"}}, r"sweep\.datasets\.dataset: 'nope' is not"),
    ({"r": {"dataset": "a"}}, {**GRID, "datasets": {}}, r"sweep\.datasets: required"),
    ({"r": {"dataset": "a"}}, {**GRID, "datasets": {"tune": "a5"}}, r"sweep\.datasets\.tune: a5 is not of its length"),
    ({"r": {"dataset": "a"}}, {**GRID, "datasets": {"tune": "a", "c": "b"}},
     r"sweep\.datasets\.c: another trial dataset has 3 dictionaries too"),
    ({"r": {"dataset": "a"}}, {**GRID, "datasets": {"tune": "none"}}, r"sweep\.datasets\.none: its dataset has n_eval 0"),
    ({"r": {"dataset": "none"}}, None, r"runs\.r\.dataset: its dataset has n_eval 0"),
])
def test_bad_sweep_params_fail_before_any_work(tmp_path, runs_spec, sweep_spec, message):
    with pytest.raises(ParamError, match=message):
        _finetune(_profile(tmp_path, runs_spec, sweep_spec))


def test_bad_threshold(tmp_path):
    with pytest.raises(ParamError, match=r"learned_threshold: a held-out value accuracy in \[0, 1\], got 1.5"):
        _finetune(_profile(tmp_path, {"r": {"dataset": "a"}}, threshold=1.5))


def test_runs_take_the_sweep_winner_once_it_is_recorded(tmp_path):
    params = _finetune(_profile(tmp_path, {"r": {"dataset": "a", **SWEPT}, "fixed": {"dataset": "b"}}, GRID))
    trials = params.sweep_jobs()
    assert list(trials) == ["tune-lr0.0001-ep1", "tune-lr0.0001-ep2", "tune-lr0.0003-ep1", "tune-lr0.0003-ep2"]
    assert {t.train_config.out_dir for t in trials.values()} == {str(params.sweep_dir / n) for n in trials}
    assert {t.train_config.gradient_accumulation_steps for t in trials.values()} == {4}
    job = params.jobs()["r"]  # before the sweep: the grid's largest values, waiting
    assert job.awaiting_sweep and job.from_sweep == ("learning_rate", "epochs")
    assert (job.train_config.learning_rate, job.train_config.epochs) == (3e-4, 2)
    assert not params.jobs()["fixed"].awaiting_sweep and params.jobs()["fixed"].from_sweep == ()
    assert [j.name for j in params.training_jobs()] == [*trials, "r", "fixed"]  # what a planner costs
    table = runs.training_table(params)
    assert [row["learning_rate"] for row in table][-2:] == ["sweep", 5e-6] and table[0]["run"].startswith("sweep trial")
    with pytest.raises(ParamError, match="which has not run"):
        runs.train_job(job)

    outcome = sweep.select([_trial(1e-4, 2, 0.75), _trial(3e-4, 1, 0.75, steps=20)], 0.5)
    sweep.write_record(params.sweep_dir / sweep.RECORD_FILE, params.sweep_key(), [], outcome)
    job = params.jobs()["r"]
    assert not job.awaiting_sweep and job.not_trained is None
    assert (job.train_config.learning_rate, job.train_config.epochs) == (1e-4, 2)
    # a changed definition (here the threshold) makes the record stale: the sweep runs again
    stale = _finetune(_profile(tmp_path / "other", {"r": {"dataset": "a", **SWEPT}}, GRID, threshold=0.6))
    assert stale.sweep_key() != params.sweep_key()
    sweep.write_record(params.sweep_dir / sweep.RECORD_FILE, stale.sweep_key(), [], outcome)
    assert params.jobs()["r"].awaiting_sweep

    nobody = sweep.select([_trial(1e-4, 1, 0.0)], 0.5)
    sweep.write_record(params.sweep_dir / sweep.RECORD_FILE, params.sweep_key(), [], nobody)
    job = params.jobs()["r"]
    assert job.not_trained == nobody["reason"] and not job.awaiting_sweep
    assert "r" not in [j.name for j in params.training_jobs()]  # nothing to train
    with pytest.raises(ParamError, match="not trained: no sweep trial learned its task"):
        runs.train_job(job)


def test_a_run_takes_its_dataset_at_the_length_the_sweep_picked(tmp_path):
    lengths = {**GRID, "datasets": {"tune": "a", "tune5": "a5"}, "epochs": [1]}
    params = _finetune(_profile(tmp_path, {"r": {"dataset": "sweep", **SWEPT}, "fixed": {"dataset": "b", **SWEPT}},
                                lengths))
    assert list(params.sweep_jobs()) == ["tune5-lr0.0001-ep1", "tune5-lr0.0003-ep1", "tune-lr0.0001-ep1",
                                         "tune-lr0.0003-ep1"]  # longest first
    job = params.jobs()["r"]  # before the sweep: the longest candidate's dataset, what the run costs at most
    assert (job.dataset, job.awaiting_sweep, job.from_sweep) == ("a5", True, ("dataset", "learning_rate", "epochs"))
    assert runs.training_table(params)[-2]["dataset"] == "sweep"
    short = sweep.select([_trial(1e-4, 1, 0.2, dataset="tune5", num_dicts=5), _trial(3e-4, 1, 0.7, dataset="tune",
                                                                                      num_dicts=3)], 0.5)
    sweep.write_record(params.sweep_dir / sweep.RECORD_FILE, params.sweep_key(), [], short)
    jobs = params.jobs()
    assert (jobs["r"].dataset, jobs["r"].data_config.num_dicts, jobs["r"].train_config.learning_rate) == ("a", 3, 3e-4)
    assert jobs["r"].train_config.train_file == str(tmp_path / "data" / "t" / "a" / "train.jsonl")
    assert jobs["fixed"].dataset == "b" and jobs["fixed"].train_config.learning_rate == 3e-4  # its own length
    # notebook 07 draws its in-distribution prompts (and its grid's base) from the dataset the run trained on
    kv = from_mapping(notebooks.KVRetrievalNotebookParams, {
        "profile": "t", "params_root": str(tmp_path / "params"), "models": {"ft": {"run": "r"}},
        "in_distribution": {"run": "r"}, "litm": None, "grid": {"run": "r", "num_dicts": [4]}})
    assert kv.section_dataset("in_distribution") == "a" and kv.grid_config().num_dicts == 3
    for section, message in [({"run": "fixed"}, r"in_distribution\.run: 'fixed' is not a run among the models"),
                             ({"run": "r", "dataset": "a"}, r"in_distribution: give its dataset or the run"),
                             ({}, r"in_distribution: give its dataset or the run")]:
        with pytest.raises(ParamError, match=message):
            from_mapping(notebooks.KVRetrievalNotebookParams, {
                "profile": "t", "params_root": str(tmp_path / "params"), "models": {"ft": {"run": "r"}},
                "in_distribution": section, "litm": None, "grid": None})


def test_a_run_the_sweep_picked_has_its_data_written_before_it_is_recorded(tmp_path, monkeypatch):
    """On a fresh runs/ (notebook 01 up to date and skipped), the dataset of a run that takes it from the sweep
    exists only once the sweep has picked it: notebook 02 records it through record_job_data, which writes it first."""
    monkeypatch.chdir(tmp_path)
    params = _finetune(_profile(tmp_path, {"r": {"dataset": "sweep", **SWEPT}}, {**GRID, "epochs": [1]}))
    won = sweep.select([_trial(1e-4, 1, 0.7, dataset="tune", num_dicts=3)], 0.5)
    sweep.write_record(params.sweep_dir / sweep.RECORD_FILE, params.sweep_key(), [], won)
    job = params.jobs()["r"]
    assert not (job.data_dir / "train.jsonl").exists()
    recorded = runs.record_job_data(tmp_path / "results", "02_finetune", job)
    assert [(r["path"], r["sha256"]) for r in recorded] == [
        (f"data/t/a/{split}.jsonl", file_sha256(job.data_dir / f"{split}.jsonl")) for split in ("eval", "train")]
    assert runs.record_job_data(tmp_path / "results", "02_finetune", job) == recorded  # again: same files, same record


# ------------------------------------------------------------------ held-out checks read from what 02 wrote


def _as_trained(params: notebooks.FinetuneNotebookParams, job, values: list[int], steps: int = 10) -> None:
    """Run `job` as notebook 02 leaves it, without a model: a finished run (train_summary.json of its identity) and
    its held-out answers (heldout.json, keyed as runs.heldout_check keys them) scoring `values`."""
    ensure_dataset(job.data_config, job.data_dir)
    out = Path(job.train_config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / train.SUMMARY_FILE
    summary.write_text(json.dumps({**train.run_identity(job.train_config), "global_steps": steps,
                                   "model_dir": str(out / "model")}))
    weights = out / "model" / "model.safetensors"  # stands for the trained weights: bytes of what they score
    weights.parent.mkdir(exist_ok=True)
    weights.write_bytes(bytes(values))
    rows = [{"model": "finetuned", "id": f"x{i}", "run": job.name, "value": bool(v), "exact": bool(v),
             "dictionary": bool(v)} for i, v in enumerate(values)]
    key = {"weights_sha256": files_sha256([weights]), **params.heldout_settings()}
    (out / runs.HELDOUT_FILE).write_text(json.dumps({"key": key, "identity": {"dtype": "float32"}, "rows": rows}))


def test_run_sweep_judges_trials_on_what_they_scored_and_records_the_pick(tmp_path):
    params = _finetune(_profile(tmp_path, {"r": {"dataset": "a", **SWEPT}}, GRID))
    scores = {"tune-lr0.0001-ep1": [0, 0, 1], "tune-lr0.0001-ep2": [1, 1, 0], "tune-lr0.0003-ep1": [1, 1, 0],
              "tune-lr0.0003-ep2": [0, 0, 0]}
    for name, job in params.sweep_jobs().items():
        _as_trained(params, job, scores[name], steps=int(10 * job.train_config.epochs))
    trials, outcome = runs.run_sweep(params)
    # two trials at 2 of 3: the one with less learning rate x steps (1e-4 x 20 = 2e-3 < 3e-4 x 10 = 3e-3) wins
    assert outcome["winner"] == "tune-lr0.0001-ep2" and [t["trial"] for t in trials if t["chosen"]] == ["tune-lr0.0001-ep2"]
    row = next(t for t in trials if t["trial"] == "tune-lr0.0003-ep1")
    assert (row["steps"], row["n"], row["learned"]) == (10, 3, True) and math.isclose(row["lr_x_steps"], 3e-3)
    assert math.isclose(row["value"], 2 / 3) and row["ci_low"] < 2 / 3 < row["ci_high"]  # Wilson, not a point
    job = params.jobs()["r"]
    assert (job.train_config.learning_rate, job.train_config.epochs, job.awaiting_sweep) == (1e-4, 2, False)
    record = json.loads((params.sweep_dir / sweep.RECORD_FILE).read_text())
    assert record["rule"] == sweep.RULE and len(record["trials"]) == 4
    assert runs.run_sweep(_finetune(_profile(tmp_path / "none", {"r": {"dataset": "a"}}))) == ([], None)


def test_run_sweep_trains_a_shorter_length_only_where_no_longer_one_learned(tmp_path, monkeypatch):
    lengths = {**GRID, "datasets": {"tune": "a", "tune5": "a5"}, "epochs": [1]}
    called, real = [], runs.heldout_check
    monkeypatch.setattr(runs, "heldout_check", lambda p, job: called.append(job.name) or real(p, job))
    for root, long_scores, expected in [(tmp_path / "learned", [1, 1, 0], ["tune5-lr0.0001-ep1", "tune5-lr0.0003-ep1"]),
                                        (tmp_path / "failed", [0, 0, 1], None)]:
        params = _finetune(_profile(root, {"r": {"dataset": "sweep", **SWEPT}}, lengths))
        for name, job in params.sweep_jobs().items():
            _as_trained(params, job, long_scores if name.startswith("tune5") else [1, 1, 1])
        called.clear()
        trials, outcome = runs.run_sweep(params)
        if expected is not None:  # the longer length learned: the shorter one, which cannot win, costs nothing
            assert called == expected and outcome["dataset"] == "tune5" and params.jobs()["r"].dataset == "a5"
            skipped = [t for t in trials if t.get("not_trained")]
            assert [t["trial"] for t in skipped] == ["tune-lr0.0001-ep1", "tune-lr0.0003-ep1"]
            assert skipped[0]["not_trained"] == "a trial at 5 dictionaries learned" and not skipped[0]["chosen"]
        else:  # it did not: every trial is trained, and the shorter length wins
            assert called == list(params.sweep_jobs()) and outcome["dataset"] == "tune"
            assert params.jobs()["r"].dataset == "a" and not any(t.get("not_trained") for t in trials)


def test_heldout_table_says_which_finetunes_learned():
    rows = [{"run": "good", "model": "original", "exact": False, "value": False, "dictionary": False},
            *({"run": "good", "model": "finetuned", "exact": v, "value": v, "dictionary": v} for v in (True, True, False)),
            *({"run": "bad", "model": "finetuned", "exact": False, "value": v, "dictionary": False} for v in (True, False))]
    def learned(threshold):
        return {(r["run"], r["model"]): r["learned"] for r in runs.heldout_table(rows, threshold)}

    assert learned(0.5) == {("good", "original"): None, ("good", "finetuned"): True, ("bad", "finetuned"): True}
    assert learned(0.6) == {("good", "original"): None, ("good", "finetuned"): True, ("bad", "finetuned"): False}
    assert learned(0.75)[("good", "finetuned")] is False  # 2 of 3
    assert learned(0.0)[("bad", "finetuned")] is True  # threshold 0: every finetune enters


def test_learned_check_when_every_item_agrees_and_n_is_tiny():
    """Wilson intervals, never a point: 3 of 3 or 0 of 3 still leave most of [0, 1] open; one item decides alone."""
    rows = [{"value": v} for v in (True, True, True)]
    check = runs.learned_check("r", rows, 0.5)
    assert (check["value"], check["learned"], check["reason"]) == (1.0, True, None)
    assert 0.3 < check["ci_low"] < 0.5 and check["ci_high"] == 1.0
    check = runs.learned_check("r", [{"value": False}] * 3, 0.5)
    assert check["value"] == 0.0 and check["ci_low"] == 0.0 and check["ci_high"] > 0.5
    assert check["reason"] == "held-out value accuracy 0.0% of 3 < 50%"
    assert runs.learned_check("r", [{"value": True}], 0.5)["learned"]
    nothing = runs.learned_check("r", [], 0.5)
    assert nothing["n"] == 0 and not nothing["learned"] and nothing["reason"] == "no held-out prompt scored"


# ------------------------------------------------------------------ the gate of the evaluation notebooks

MODELS = {"original": {"model": "smollm2-135m-instruct"}, "s0": {"run": "a"}, "s1": {"run": "b"}, "alone": {"run": "c"}}
GROUPS = {"group": ["s0", "s1"]}


def _gate_profile(tmp_path, threshold=0.5):
    root = _profile(tmp_path, {"a": {"dataset": "a"}, "b": {"dataset": "b"}, "c": {"dataset": "c"}}, threshold=threshold)
    params = _finetune(root)
    jobs = params.jobs()
    for name, values in {"a": [1, 1, 1], "b": [0, 0, 1], "c": [1, 1, 0]}.items():
        _as_trained(params, jobs[name], values)
    P = from_mapping(notebooks.MDQANotebookParams, {"profile": "t", "params_root": str(root), "models": MODELS,
                                                    "seed_groups": GROUPS, "settings": ["random"]})
    return root, params, P


def test_a_run_that_did_not_learn_is_left_out_and_its_claims_are_not_tested(tmp_path):
    root, params, P = _gate_profile(tmp_path)
    gate = runs.learned_gate(P)  # read from the heldout.json files notebook 02 wrote: no model is loaded
    assert {label: c["learned"] for label, c in gate.checks.items()} == {"s0": True, "s1": False, "alone": True}
    assert gate.checks["s1"]["reason"] == "held-out value accuracy 33.3% of 3 < 50%"
    assert gate.files == [Path(params.jobs()[r].train_config.out_dir) / runs.HELDOUT_FILE for r in "abc"]
    assert list(gate.evaluated(P.model_configs())) == ["original", "s0", "alone"]  # s1 costs nothing
    assert gate.learned_seed_groups == {}  # a group with a member left out is not averaged
    assert gate.reasons() == {"group": "s1: held-out value accuracy 33.3% of 3 < 50%"}
    # the judged claims: the group (not tested, with s1's accuracy) and "alone" (tested); s0, evaluated alone, is a
    # member of the group and not judged on its own
    pooled = [{"model": m, "setting": mdqa.SETTING_RANDOM, "delta_correct": 0.1, "ci_low": 0.05, "ci_high": 0.15,
               "p_increase": 0.001, "p_decrease": 0.999, "baseline_value": 0.3, "baseline_ci_low": 0.2,
               "baseline_ci_high": 0.4} for m in ("s0", "alone")]
    claims = gate.judge(paper.mdqa_claims, pooled, mdqa.pooled_keys([mdqa.SETTING_RANDOM]), "original",
                        mdqa.SETTING_RANDOM, mdqa.SETTING_RETRIEVED)
    by_model = {c["model"]: c for c in claims}
    assert set(by_model) == {"group", "alone"}
    assert by_model["group"]["verdict"] == f"{paper.NOT_TESTED} (s1: held-out value accuracy 33.3% of 3 < 50%)"
    assert by_model["group"]["ci"] == "" and by_model["group"]["family_size"] is None
    assert by_model["alone"]["verdict"] == "holds" and by_model["alone"]["family_size"] == 1
    assert paper.artifact_verdict([c["verdict"] for c in claims]) == "holds"
    table = gate.report(tmp_path / "results", "03_mdqa")
    assert list(table["learned"]) == [True, False, True]
    assert (tmp_path / "results" / "03_mdqa" / "learned_own_task.csv").is_file()
    recorded = json.loads((tmp_path / "results" / "03_mdqa" / "inputs.json").read_text())
    assert len(recorded) == 3


def test_every_claims_function_lists_the_left_out_as_not_tested(tmp_path):
    """With no finetune evaluated at all (every run left out) each notebook's claims still name them, not tested."""
    _, _, P = _gate_profile(tmp_path, threshold=1.0)  # nothing scored 3 of 3 except run a
    gate = runs.learned_gate(P)
    assert set(gate.reasons()) == {"group", "alone"}
    checks = {
        "fig5": gate.judge(paper.mdqa_claims, [], mdqa.pooled_keys([mdqa.SETTING_RANDOM, mdqa.SETTING_RETRIEVED]),
                           "original", mdqa.SETTING_RANDOM, mdqa.SETTING_RETRIEVED),
        "fig6_7": gate.judge(paper.flenqa_claims, [], [{"style": "normal"}, {"style": "cot"}], "original", []),
        "fig9": gate.judge(paper.longer_context_claims, [], [{"setting": mdqa.SETTING_RANDOM}], "original", 45),
        "table1": gate.judge(paper.general_claims, [], [{"task": "mmlu", "metric": "acc"}], "original",
                             {"mmlu": "acc"}, {"mmlu": "MMLU"}),
    }
    counts = {name: len(claims) for name, claims in checks.items()}
    assert counts == {"fig5": 6, "fig6_7": 4, "fig9": 2, "table1": 2}  # 3 MDQA claims, 2 styles, 1, 1 per label
    for claims in checks.values():
        assert all(c["verdict"].startswith(paper.NOT_TESTED) for c in claims)
        assert {c["model"] for c in claims} == {"group", "alone"}
    assert "held-out value accuracy 66.7% of 3 < 100%" in {c["model"]: c for c in checks["fig9"]}["alone"]["verdict"]


def test_a_new_threshold_is_written_where_the_notebooks_read_it(tmp_path):
    """The check is kept beside the run: a new learned_threshold rewrites it without scoring again, so the
    evaluation notebooks that recorded it as an input run again."""
    root, params, P = _gate_profile(tmp_path)
    path = Path(params.jobs()["c"].train_config.out_dir) / runs.HELDOUT_FILE
    first = runs.heldout_check(params, params.jobs()["c"])
    assert first["check"]["learned"] and json.loads(path.read_text())["check"] == first["check"]
    before = file_sha256(path)
    stricter = _finetune(_profile(tmp_path, {"a": {"dataset": "a"}, "b": {"dataset": "b"}, "c": {"dataset": "c"}},
                                  threshold=0.9))
    check = runs.heldout_check(stricter, stricter.jobs()["c"])["check"]
    assert not check["learned"] and check["threshold"] == 0.9 and file_sha256(path) != before
    assert json.loads(path.read_text())["rows"] == first["rows"]


def test_a_retraining_to_the_same_weights_keeps_the_check_and_other_weights_score_again(tmp_path, monkeypatch):
    """heldout.json is keyed by the weights it scored: a retraining that reproduces them (a new train_summary.json,
    whose wall time differs) leaves the file byte-identical, so the notebooks that recorded it stay current; other
    weights are scored again."""
    root, params, P = _gate_profile(tmp_path)
    job = params.jobs()["c"]
    out = Path(job.train_config.out_dir)
    path = out / runs.HELDOUT_FILE
    runs.heldout_check(params, job)
    before = file_sha256(path)
    scored = []
    monkeypatch.setattr(runs, "score_heldout", lambda params, spec, samples, label: scored.append(spec) or (
        [{"model": label, "id": "x0", "value": False, "exact": False, "dictionary": False}], {"dtype": "float32"}))
    summary = out / train.SUMMARY_FILE
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "wall_seconds": 123.4}))  # retrained
    assert runs.heldout_check(params, job)["check"]["value"] == 2 / 3 and scored == []
    assert file_sha256(path) == before
    (out / "model" / "model.safetensors").write_bytes(b"other weights")
    check = runs.heldout_check(params, job)["check"]
    assert len(scored) == 1 and (check["n"], check["value"]) == (1, 0.0) and file_sha256(path) != before


def test_the_same_weights_give_the_same_heldout_file_in_every_checkout(tmp_path, monkeypatch):
    """heldout.json is an input the evaluation notebooks compare by hash: two checkouts in other folders that score the
    same weights write the same bytes (the backend identity's absolute model path is left out, its weights hash
    kept), so a clone that retrains a run to the committed weights does not find the notebooks stale."""
    def score(params, spec, samples, label):  # an HFBackend's identity names the model's absolute path
        weights = files_sha256([Path(spec) / "model.safetensors"])
        identity = {"backend": "hf", "dtype": "float32",
                    "model": {"spec": "runs/models/t/c/model", "path": str(Path(spec).resolve()),
                              "weights_sha256": weights}}
        return [{"model": label, "id": "x0", "value": True, "exact": True, "dictionary": True}], identity

    monkeypatch.setattr(runs, "score_heldout", score)
    files = []
    for checkout in ("one", "elsewhere"):
        _, params, _ = _gate_profile(tmp_path / checkout)
        job = params.jobs()["c"]
        path = Path(job.train_config.out_dir) / runs.HELDOUT_FILE
        path.unlink()  # scored here, by this checkout
        runs.heldout_check(params, job)
        files.append(path.read_bytes())
    assert files[0] == files[1]
    identity = json.loads(files[0])["identity"]
    assert str(tmp_path) not in files[0].decode() and identity["model"]["weights_sha256"]
    assert identity["model"]["spec"] == "runs/models/t/c/model"


def test_a_run_the_sweep_left_without_a_recipe_is_not_tested(tmp_path):
    root = _profile(tmp_path, {"r": {"dataset": "a", **SWEPT}}, GRID)
    params = _finetune(root)
    for job in params.sweep_jobs().values():
        _as_trained(params, job, [0, 0, 0])
    trials, outcome = runs.run_sweep(params)
    assert outcome["winner"] is None and not any(t["chosen"] for t in trials)
    P = from_mapping(notebooks.MDQANotebookParams, {"profile": "t", "params_root": str(root), "settings": ["random"],
                                                    "models": {"original": {}, "tuned": {"run": "r"}}})
    gate = runs.learned_gate(P)
    assert gate.reasons() == {"tuned": f"not trained: {outcome['reason']}"}
    assert gate.files == [params.sweep_dir / sweep.RECORD_FILE]
    (claim,) = gate.judge(paper.longer_context_claims, [], [{"setting": mdqa.SETTING_RANDOM}], "original", 45)
    assert claim["verdict"] == f"{paper.NOT_TESTED} (not trained: {outcome['reason']})"


def test_baselines_notebook_lists_its_left_out_finetune_as_not_tested():
    from types import SimpleNamespace

    from kvlib.pipeline import baselines_study as study

    gate = runs.LearnedGate({"original": {}, "ft": {"run": "x"}}, {}, {"ft": {"learned": False, "reason": "why"}}, [])
    P = SimpleNamespace(models={"original": {}, "ft": {"run": "x"}}, original="original", baselines={"IN2": {"kind": "in2"}},
                        flenqa_params=lambda: SimpleNamespace(styles=["normal"]),
                        general_params=lambda: SimpleNamespace(tasks={"triviaqa": {}}))
    baseline = {"model": "IN2", "delta_correct": 0.1, "ci_low": 0.05, "ci_high": 0.15, "p_increase": 0.001,
                "p_decrease": 0.999}
    claims = study.claims(P, [{**baseline, "setting": mdqa.SETTING_RANDOM}], [{**baseline, "style": "normal"}], [],
                          gate=gate)
    left_out = [c for c in claims if c["model"] == "ft"]
    assert {c["artifact"] for c in left_out} == {"fig8"} and len(left_out) == 2
    assert all(c["verdict"] == f"{paper.NOT_TESTED} (why)" for c in left_out)
