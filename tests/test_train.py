"""Finetuning: answer-only masking, resume equivalence, full and LoRA paths, dry run, params."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from kvlib.tasks import synthetic as gen
from kvlib.engine import train
from kvlib.engine.config import ParamError, from_mapping, load_yaml
from kvlib.pipeline import notebooks

ROOT = Path(__file__).resolve().parents[1]


def char_counter(texts):
    return [len(t) // 3 for t in texts]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """12 tiny simple-task samples (2 dictionaries) in the HF chat format `kvlib generate` writes."""
    cfg = gen.GenerationConfig(num_dicts=2, n_train=12, n_eval=0, max_tokens=400, tokenizer="chars")
    out = tmp_path_factory.mktemp("data")
    samples = gen.generate(cfg, char_counter)["train"]
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": s.messages()}) + "\n" for s in samples))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, embedded_checkpoint) -> str:
    """A 2-layer random Llama with the embedded model's tokenizer and chat template (trains in seconds)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_cfg(chat_file, tiny_model, out_dir, **kw) -> train.TrainConfig:
    base = dict(train_file=str(chat_file), out_dir=str(out_dir), model=tiny_model, max_steps=6,
                gradient_accumulation_steps=2, per_device_batch_size=1, learning_rate=1e-3, save_steps=2,
                logging_steps=1, lr_scheduler="linear")
    base.update(kw)
    return from_mapping(train.TrainConfig, base)


def state_dict(model_dir: Path):
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, f"no weights in {model_dir}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------ masking

@pytest.mark.slow
def test_only_answer_tokens_carry_loss(embedded_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint)
    msgs = [{"role": "user", "content": "Report the value of key 12."},
            {"role": "assistant", "content": "The value of key 12 is 345 and it is in Dictionary [2]."}]
    ex = train.tokenize_chat(tok, msgs)
    full = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    prompt = list(tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ex["input_ids"] == full
    assert len(ex["labels"]) == len(full)
    end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prompt))
    for i, (token, label) in enumerate(zip(full, ex["labels"])):
        if i < len(prompt) or i > end:
            assert label == train.IGNORE_INDEX, f"token {i} ({tok.decode([token])!r}) must carry no loss"
        else:
            assert label == token, f"answer token {i} must be its own label"
    labelled = tok.decode([t for t in ex["labels"] if t != train.IGNORE_INDEX])
    assert labelled == msgs[1]["content"] + "<|im_end|>"  # ChatML's newline after <|im_end|> is not the answer
    assert msgs[1]["content"] not in tok.decode(prompt)


def test_answer_token_losses_classify_tokens_and_match_the_training_loss(tiny_model):
    """Fig. 4's per-token losses: one row per answer token (incl. end of turn), kinds by whole numbers (key 97
    is not found inside value 975), and their mean equals the model's own answer-only training loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sample = gen.Sample("Report the value of key 97 and the dictionary it is in.",
                        "The value of key 97 is 975 and it is in Dictionary [3].",
                        {"id": "x-eval-00000", "template": True, "key": 97, "value": 975, "gold_dict_name": "3"})
    rows = train.answer_token_losses(tiny_model, [sample], "tiny")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "".join(r["token"] for r in rows)
    assert text.startswith(sample.answer) and "<|im_end|>" in text
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], "")
        by_kind[r["kind"]] += r["token"]
    assert by_kind["key"].strip() == "97" and by_kind["value"].replace(" ", "") == "9753"
    ex = train.tokenize_chat(tok, sample.messages())
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.inference_mode():
        loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item()
    assert sum(r["loss"] for r in rows) / len(rows) == pytest.approx(loss, rel=1e-4)


def test_collate_right_pads_and_masks():
    fn = train.collate(pad_token_id=0)
    batch = fn([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_malformed_chat_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2:"):
        train.read_chat_file(bad)
    with pytest.raises(ParamError, match=r"^train_file: .* does not exist"):
        train.read_chat_file(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------ training runs

class KillAt:
    """A TrainerCallback that 'kills' training after a given optimizer step (as a crash would)."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):  # every other callback event: no-op
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"killed at step {state.global_step}")


def test_last_checkpoint_passes_over_a_save_cut_short(tmp_path):
    """Trainer writes trainer_state.json last: a checkpoint without it, or with it truncated, was being saved
    when the process died, so resuming uses the newest complete one."""
    cfg = train.TrainConfig(train_file="unused.jsonl", out_dir=str(tmp_path))
    assert train.last_checkpoint(cfg) is None
    ckpts = tmp_path / "checkpoints"
    for step, state in ((10, '{"global_step": 10}'), (20, '{"global_step": 20}'), (30, '{"global_st'), (40, None)):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w")
        if state is not None:
            (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (ckpts / "checkpoint-x").mkdir()  # not a Trainer checkpoint name
    assert train.last_checkpoint(cfg) == str(ckpts / "checkpoint-20")
    complete, partial = train.checkpoint_dirs(cfg)
    assert [p.name for p in complete] == ["checkpoint-10", "checkpoint-20"]
    assert [p.name for p in partial] == ["checkpoint-30", "checkpoint-40"]


def test_mean_train_loss_weights_each_logged_loss_by_its_steps():
    every_step = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.0},
                  {"step": 3, "train_runtime": 9.0}]  # the final metrics entry carries no loss
    assert train.mean_train_loss(every_step) == pytest.approx(0.5)
    # logging_steps=2 over 5 steps: the last entry covers one step
    assert train.mean_train_loss([{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5},
                                  {"step": 5, "loss": 0.0}]) == pytest.approx((2 * 1.0 + 2 * 0.5) / 5)
    with pytest.raises(ValueError, match="no training loss"):
        train.mean_train_loss([{"step": 3, "train_runtime": 9.0}])


def test_read_summary_takes_the_loss_of_the_whole_run_from_its_loss_log(tmp_path):
    # a summary written by a run resumed at step 2: transformers' mean over steps 3-4 only
    summary = {"global_steps": 4, "final_train_loss": 0.25}
    (tmp_path / train.SUMMARY_FILE).write_text(json.dumps(summary))
    assert train.read_summary(tmp_path)["final_train_loss"] == 0.25  # no loss log: as stored
    train.write_loss_csv([{"step": s, "epoch": s / 4, "loss": x} for s, x in enumerate([1.0, 0.5, 0.3, 0.2], 1)],
                         tmp_path / "loss.csv")
    assert train.read_summary(tmp_path)["final_train_loss"] == pytest.approx(0.5)
    assert json.loads((tmp_path / train.SUMMARY_FILE).read_text()) == summary  # the file is not rewritten


@pytest.mark.slow
def test_resume_gives_same_final_weights(chat_file, tiny_model, tmp_path):
    straight = make_cfg(chat_file, tiny_model, tmp_path / "straight")
    straight_summary = train.train(straight, resume=False)

    killed = make_cfg(chat_file, tiny_model, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        train.train(killed, resume=False, callbacks=[KillAt(3)])
    assert train.last_checkpoint(killed).endswith("checkpoint-2")
    # a process killed while saving step 4 leaves that checkpoint without its trainer state: passed over, removed
    partial = tmp_path / "killed" / "checkpoints" / "checkpoint-4"
    shutil.copytree(tmp_path / "killed" / "checkpoints" / "checkpoint-2", partial)
    (partial / "trainer_state.json").unlink()
    assert train.last_checkpoint(killed).endswith("checkpoint-2")
    assert not train.is_finished(killed)
    with pytest.raises(ParamError, match="pass --resume"):
        train.train(killed, resume=False)
    summary = train.train(killed, resume=True)
    assert summary["resumed_from"] == "checkpoint-2" and summary["global_steps"] == 6
    # the reported loss is the whole run's, not only the steps after the resume
    assert summary["final_train_loss"] == pytest.approx(straight_summary["final_train_loss"], rel=1e-12)

    a, b = state_dict(tmp_path / "straight" / "model"), state_dict(tmp_path / "killed" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"
    # the loss curve of the resumed run is the uninterrupted one
    rows = lambda p: list(csv.DictReader(open(p / "loss.csv")))  # noqa: E731
    assert [r["loss"] for r in rows(tmp_path / "straight")] == [r["loss"] for r in rows(tmp_path / "killed")]


@pytest.mark.slow
def test_changed_recipe_or_data_starts_over_instead_of_resuming(chat_file, tiny_model, tmp_path):
    own_file = tmp_path / "train.jsonl"  # a copy: this test rewrites it
    own_file.write_text(Path(chat_file).read_text())
    chat_file = own_file
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train(make_cfg(chat_file, tiny_model, out), resume=False, callbacks=[KillAt(3)])
    assert train.checkpoints_belong_to(make_cfg(chat_file, tiny_model, out))
    # another learning rate in the same out_dir: its checkpoints are not this run's
    other = make_cfg(chat_file, tiny_model, out, learning_rate=1e-4)
    assert not train.checkpoints_belong_to(other)
    with pytest.raises(ParamError, match="another config or training file"):
        train.train(other, resume=True)
    summary = train.train(other, resume="auto")
    assert summary["resumed_from"] is None and summary["global_steps"] == 6
    assert train.is_finished(other) and not train.is_finished(make_cfg(chat_file, tiny_model, out))
    # the same config on a regenerated training file (same path, other bytes) is a new run too
    Path(chat_file).write_text(Path(chat_file).read_text().replace("Dictionary", "Dict"))
    assert not train.is_finished(other)


@pytest.mark.slow
def test_full_finetune_lowers_loss_and_saves_loadable_model(chat_file, tiny_model, tmp_path):
    from kvlib.engine import models

    cfg = make_cfg(chat_file, tiny_model, tmp_path / "full", max_steps=12, learning_rate=3e-3)
    summary = train.train(cfg)
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "full" / "loss.csv"))]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert summary["n_answer_tokens"] < summary["n_tokens"]
    model, tok = models.load_model(summary["model_dir"], dtype="float32")
    assert model.config.num_hidden_layers == 2
    # a finished run is reused, not retrained; its checkpoints (only for resuming) are gone unless kept
    assert not (tmp_path / "full" / "checkpoints").exists()
    assert train.train(cfg)["wall_seconds_this_session"] == summary["wall_seconds_this_session"]
    kept = dataclasses.replace(cfg, keep_checkpoints=True)
    assert train.config_hash(kept) == train.config_hash(cfg) and train.is_finished(kept)
    with pytest.raises(ParamError, match="holds no checkpoint"):
        train.train(make_cfg(chat_file, tiny_model, tmp_path / "empty"), resume=True)


@pytest.mark.slow
def test_accumulation_averages_the_loss_over_every_answer_token_of_the_global_batch(tiny_model, tmp_path):
    """A global batch of 4 taken as 4 accumulated micro-batches of 1 gets the gradient of one batch of 4: that of the
    mean cross-entropy over all answer tokens of the 4 samples, however unequal their answers (the paper's global
    batch 16 on one device). Not the mean of per-sample means, which would weigh each token of a 2-token answer as
    much as a 40-token answer's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    answers = ["7.", "The value of key 12 is 55.", " ".join(["long"] * 40) + ".", "No, there is none."]
    chats = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]
             for i, a in enumerate(answers)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))

    class Gradients(TrainerCallback):
        grads: dict = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def first_step(per_device: int, accumulation: int) -> dict:
        grab = Gradients()
        cfg = make_cfg(path, tiny_model, tmp_path / f"b{per_device}x{accumulation}", max_steps=1, max_grad_norm=1e9,
                       per_device_batch_size=per_device, gradient_accumulation_steps=accumulation)
        train.train(cfg, resume=False, callbacks=[grab])
        return grab.grads

    accumulated, batched = first_step(1, 4), first_step(4, 1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    losses = []  # per sample: its answer tokens' cross-entropies, masked as in training
    for chat in chats:
        example = train.tokenize_chat(tokenizer, chat)
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(example["labels"][1:])
        keep = targets != train.IGNORE_INDEX
        losses.append(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none"))
    assert len({len(x) for x in losses}) == 4, "answers of different lengths, or the test shows nothing"

    def gradients(loss) -> dict:
        model.zero_grad()
        loss.backward(retain_graph=True)
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    token_mean = gradients(torch.cat(losses).mean())
    sample_mean = gradients(torch.stack([x.mean() for x in losses]).mean())
    for name, expected in token_mean.items():
        assert torch.allclose(accumulated[name], expected, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(batched[name], expected, rtol=1e-4, atol=1e-6), name
    assert not all(torch.allclose(sample_mean[n], g, rtol=1e-2, atol=1e-5) for n, g in token_mean.items())


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_lora_trains_only_adapters_and_loads(chat_file, tiny_model, tmp_path, merge):
    from kvlib.engine import models

    cfg = make_cfg(chat_file, tiny_model, tmp_path / "lora", method="lora", lora_r=4, lora_alpha=8,
                   merge_lora=merge, max_steps=4)
    summary = train.train(cfg)
    model_dir = Path(summary["model_dir"])
    if merge:
        assert not (model_dir / "adapter_config.json").exists()
        assert any("lora" not in k for k in state_dict(model_dir))
    else:
        adapter = json.loads((model_dir / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == tiny_model and adapter["r"] == 4
    model, _ = models.load_model(str(model_dir), dtype="float32")
    base = state_dict(Path(tiny_model))
    if not merge:  # the base weights are untouched: only adapters were trained
        weights = dict(model.named_parameters())
        q = next(v for k, v in weights.items() if k.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
        assert (q.detach() == base["model.layers.0.self_attn.q_proj.weight"]).all()


# ------------------------------------------------------------------ dry run and params

def test_dry_run_paper_plan_offline(chat_file, tmp_path):
    """The paper profile's plan (Mistral-7B, hub unreachable) validates from the token counter and the
    shipped architecture config, without any weights."""
    cfg = from_mapping(train.TrainConfig, dict(
        train_file=str(chat_file), out_dir=str(tmp_path / "m"), model="mistralai/Mistral-7B-Instruct-v0.1",
        dry_run_tokenizer="mistral-7b-v0.1", epochs=2, gradient_accumulation_steps=16, dry_run_num_gpus=1,
        dry_run_model_config=str(ROOT / "params" / "paper-mistral" / "mistral-7b-v0.1.config.json")))
    plan = train.plan_training(cfg)
    assert plan["n_examples"] == 12 and plan["optimizer_steps"] == 2
    assert 7.1e9 < plan["n_params"] < 7.3e9, "Mistral-7B has 7.24B parameters"
    assert plan["memory_gib"]["weights_grads_optimizer"] > 100  # full finetuning needs sharding across GPUs
    assert "template allowance" in plan["token_lengths_from"]


@pytest.mark.parametrize("overrides, field", [
    ({"epochs": 0}, "epochs"), ({"method": "qlora"}, "method"), ({"learning_rate": -1}, "learning_rate"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"), ({"precison": "bf16"}, "precison"),
    ({"max_steps": 0}, "max_steps"), ({"train_file": ""}, "train_file"),
])
def test_bad_train_params(overrides, field, tmp_path):
    base = {"train_file": "x.jsonl", "out_dir": str(tmp_path)}
    base.update(overrides)
    with pytest.raises(ParamError, match=rf"^{field}:"):
        from_mapping(train.TrainConfig, base)


# ------------------------------------------------------------------ notebook 02 params

def test_finetune_notebook_params_resolve_datasets_of_the_profile():
    p = from_mapping(notebooks.FinetuneNotebookParams, {
        "profile": "quick", "params_root": str(ROOT / "params"), "models_dir": "m",
        "runs": {"a": {"dataset": "simple-template", "epochs": 1, "precision": "bf16"}}})
    job = p.jobs()["a"]
    assert job.train_config.train_file.endswith("quick/simple-template/train.jsonl")
    assert job.train_config.out_dir == "m/quick/a" and job.train_config.epochs == 1
    quick_datasets = load_yaml(ROOT / "params" / "quick" / "01_synthetic_data.yaml")["datasets"]
    assert job.data_config.num_dicts == quick_datasets["simple-template"]["num_dicts"]


@pytest.mark.parametrize("runs, message", [
    ({"a": {"dataset": "nope"}}, r"^runs\.a\.dataset: 'nope' is not defined"),
    ({"a": {"epochs": 1}}, r"^runs\.a\.dataset: required"),
    ({"a": {"dataset": "simple-template", "out_dir": "x"}}, r"^runs\.a\.out_dir: is set by the notebook"),
    ({"a": {"dataset": "simple-template", "epoks": 1}}, r"^runs\.a\.epoks: unknown parameter"),
    ({}, r"^runs: at least one run"),
])
def test_finetune_notebook_params_errors(runs, message):
    with pytest.raises(ParamError, match=message):
        from_mapping(notebooks.FinetuneNotebookParams, {"profile": "quick", "params_root": str(ROOT / "params"),
                                                    "runs": runs})


def test_openai_runs_use_the_openai_file():
    p = from_mapping(notebooks.FinetuneNotebookParams, {
        "profile": "paper-gpt35", "params_root": str(ROOT / "params"), "runs": {},
        "openai_runs": {"g": {"dataset": "multisubkey-template", "n_epochs": 2}}})
    cfg = p.openai_jobs()["g"].train_config
    assert str(cfg.train_file).endswith("multisubkey-template/train.openai.jsonl") and cfg.n_epochs == 2


def test_training_draws_a_text_bar_inside_a_notebook_kernel_too(tmp_path):
    """In a notebook kernel transformers swaps its text bar for an HTML table that no terminal shows: kvlib puts the
    text bar back (stderr, streamed by `kvlib reproduce`); elsewhere the callbacks are left as they are."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    from kvlib.engine.train import _text_progress_bar

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=False)
    trainer = Trainer(model=Tiny(), args=args)
    names = lambda: [type(cb).__name__ for cb in trainer.callback_handler.callbacks]  # noqa: E731
    _text_progress_bar(trainer)
    assert names().count("ProgressCallback") == 1 and "NotebookProgressCallback" not in names()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(NotebookProgressCallback)  # as transformers does in a kernel
    _text_progress_bar(trainer)
    assert names().count("ProgressCallback") == 1 and "NotebookProgressCallback" not in names()
