"""Supervised finetuning of open models on chat JSONL (paper §3: loss on the answer only).

Built on the HF stack (transformers `Trainer`, peft for LoRA), so the same code runs on one CPU, one GPU
or several GPUs under `accelerate launch` / `torchrun` with FSDP or DeepSpeed (see
`params/paper-mistral/accelerate_fsdp.yaml`).

Layout of an output directory:
    checkpoints/checkpoint-N/   Trainer checkpoints (model, optimizer, scheduler, RNG states); deleted when the
                                run finishes, unless keep_checkpoints
    model/                      final model: full weights, or a LoRA adapter whose base is `cfg.model`
                                (or merged weights with `merge_lora`); loadable by kvlib.engine.models.load_model
    loss.csv                    training loss per logged step
    train_config.json           the config the checkpoints belong to, written when training starts
    run_identity.json           config and training-file hashes of those checkpoints: a run whose config or
                                data changed starts over instead of resuming someone else's checkpoints
    train_summary.json          config, data hash, model identity, steps, tokens, wall time; written last,
                                so its presence means the run finished
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from kvlib.engine import meter, models
from kvlib.engine.config import (
    InputError,
    ParamError,
    check_fraction,
    check_positive,
    fail,
    from_mapping,
    load_yaml,
    params_section,
    to_mapping,
)
from kvlib.engine.data import read_jsonl_records
from kvlib.engine.io import file_sha256

IGNORE_INDEX = -100  # label value the HF loss ignores
SUMMARY_FILE = "train_summary.json"
LOSS_FILE = "loss.csv"  # the loss of every logged step: the record final_train_loss is derived from
IDENTITY_FILE = "run_identity.json"


@dataclass
class TrainConfig:
    """One finetuning run. Defaults follow the paper's Mistral recipe where it states one."""

    train_file: str = ""  # HF chat JSONL ({"messages": [..., {"role": "assistant", ...}]}), e.g. from `kvlib generate`
    out_dir: str = ""
    model: str = "smollm2-135m-instruct"
    method: Literal["full", "lora"] = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge_lora: bool = False  # save merged full weights instead of the adapter
    epochs: float = 2.0  # paper: 2
    max_steps: int = -1  # > 0 overrides epochs (tests, quick looks)
    learning_rate: float = 5e-6  # paper: 5e-6
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 16  # paper: global batch 16
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # auto: bf16 mixed precision on CUDA, fp32 on CPU; "bf16" on a CPU uses bf16 autocast, which only pays off
    # where bf16 matmuls are fast (AMX): on an avx512_bf16 host without AMX it measured 0.52x (bench_train.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_steps: int = 50
    save_total_limit: int = 2
    # checkpoints (weights + optimizer state: ~1.6 GB each for the 135M model) only serve resuming, so a finished
    # run deletes them unless asked to keep them; not part of the run's identity (config_hash)
    keep_checkpoints: bool = False
    logging_steps: int = 1
    max_length: int = 0  # 0: the model's context; a longer sample is an error, never truncated
    # dry run only: how to count tokens when the model's tokenizer is not available locally (a
    # kvlib.engine.models token-counter spec), and its architecture (a local config.json) for the memory estimate
    dry_run_tokenizer: str = ""
    dry_run_model_config: str = ""
    dry_run_num_gpus: int = 1

    def validate(self) -> None:
        if not self.train_file:
            fail("train_file", "required")
        if not self.out_dir:
            fail("out_dir", "required")
        if not self.model:
            fail("model", "required")
        models.check_model_spec(self.model, "model")  # a local path that does not exist fails here, not mid-run
        if self.epochs <= 0:
            fail("epochs", f"must be > 0, got {self.epochs}")
        if self.learning_rate <= 0:
            fail("learning_rate", f"must be > 0, got {self.learning_rate}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "save_steps", "save_total_limit",
                     "logging_steps", "lora_r", "lora_alpha", "dry_run_num_gpus"):
            check_positive(name, getattr(self, name))
        check_positive("max_length", self.max_length, 0)
        check_fraction("warmup_ratio", self.warmup_ratio)
        check_fraction("lora_dropout", self.lora_dropout)
        if self.warmup_ratio >= 1:
            fail("warmup_ratio", "must be < 1")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            fail("weight_decay" if self.weight_decay < 0 else "max_grad_norm", "out of range")
        if self.max_steps == 0 or self.max_steps < -1:
            fail("max_steps", f"must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if self.method == "lora" and not self.lora_target_modules:
            fail("lora_target_modules", "LoRA needs at least one target module")

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps


@dataclass
class LauncherConfig:
    """How a finetuning run is started (notebook 02's `launcher:`): in the calling process ("inprocess": one CPU
    or one GPU), or as its own multi-process job, `accelerate launch --config_file <config_file> --num_processes
    <num_processes> -m kvlib train --params <out_dir>/launch_params.yaml --resume-auto` ("accelerate": FSDP or
    DeepSpeed over several GPUs, as the config file says). Before a launch the run's memory estimate
    (`memory_estimate_gib`) is compared with the visible GPUs (`check_fits_gpus`)."""

    kind: Literal["inprocess", "accelerate"] = "inprocess"
    config_file: str | None = None  # accelerate's config (e.g. params/paper-mistral/accelerate_fsdp.yaml)
    num_processes: int = 1  # processes, one per GPU

    def validate(self) -> None:
        check_positive("num_processes", self.num_processes)
        if self.kind == "inprocess" and (self.config_file is not None or self.num_processes != 1):
            fail("kind", "inprocess runs in one process: config_file and num_processes are for kind accelerate")
        if self.config_file is not None and not Path(self.config_file).is_file():
            fail("config_file", f"file not found: {self.config_file} (paths are relative to the repository root)")

    def command(self, params_file: str | Path, accelerate: str = "accelerate") -> list[str]:
        """The command line that trains the run described by `params_file` (a `kvlib train` params YAML)."""
        if self.kind != "accelerate":
            raise ValueError(f"launcher kind {self.kind!r} runs in process, not as a command")
        config = ["--config_file", str(self.config_file)] if self.config_file else []
        return [accelerate, "launch", *config, "--num_processes", str(self.num_processes),
                "-m", "kvlib", "train", "--params", str(params_file), "--resume-auto"]


def config_from_file(path: Path, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from YAML (top-level keys or under `train:`), plus overrides."""
    data = params_section(load_yaml(path), "train")[0]
    data.update(overrides or {})
    return from_mapping(TrainConfig, data)


NOT_IN_IDENTITY = ("keep_checkpoints",)  # fields that do not change what a run trains


def _identity_fields(config: dict) -> dict:
    """A config mapping without the fields that do not change what a run trains."""
    return {k: v for k, v in config.items() if k not in NOT_IN_IDENTITY}


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(_identity_fields(to_mapping(cfg)), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- data

def read_chat_file(path: Path) -> list[list[dict]]:
    """Conversations from a chat JSONL; each must end with an assistant message (the training target)."""

    path = Path(path)
    if not path.is_file():
        raise ParamError(f"train_file: {path} does not exist (generate it first, e.g. `kvlib generate`)")
    try:
        rows, _ = read_jsonl_records(path)
    except ValueError as exc:  # a line that is not JSON: `path:line: ...`, one line
        raise InputError(" ".join(str(exc).split()) + "; fix that line or regenerate the file") from None
    if not rows:
        raise ParamError(f"train_file: {path} holds no examples")
    chats = []
    for lineno, row in rows:
        msgs = row.get("messages") if isinstance(row, dict) else None
        if (not isinstance(msgs, list) or len(msgs) < 2
                or any(not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                       or not isinstance(m.get("content"), str) for m in msgs)
                or msgs[-1]["role"] != "assistant"):
            raise InputError(f"{path}:{lineno}: expected {{'messages': [..., {{'role': 'assistant', ...}}]}} "
                             f"with roles system/user/assistant and string contents")
        chats.append(msgs)
    return chats


@dataclass
class _ChatLayout:
    """One conversation rendered by the model's chat template: its token ids, each token's character span in the
    rendered text, the span of the final assistant turn's text, and which tokens carry loss."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    answer_span: tuple[int, int]
    first: int  # index of the first token that carries loss
    stop: int  # index of the last one (the end-of-turn token after the answer, when the template writes one)


def _chat_layout(tokenizer, messages: list[dict]) -> _ChatLayout:
    messages = models.fit_to_template(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    if not text.startswith(prompt):
        # a template that renders earlier turns differently once an answer follows: masking by prefix
        # would be wrong, so refuse rather than train on a misaligned mask
        raise ValueError("the chat template's prompt is not a prefix of the full conversation; "
                         "answer-only masking needs a prefix-stable template")
    answer = messages[-1]["content"].strip()  # templates may trim the turn (Llama 3's does)
    start = text.find(answer, len(prompt))
    if start < 0:
        raise ValueError("the chat template changes the answer's text; the answer-only loss cannot be located")
    end = start + len(answer)
    # the same ids as apply_chat_template(tokenize=True): the rendered text without added special tokens
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and start < b]
    if not inside:
        raise ValueError("the answer covers no token of the rendered conversation")
    ends = set(models.end_of_turn_ids(tokenizer))
    stop = next((i for i in range(inside[-1] + 1, len(ids)) if ids[i] in ends), inside[-1])
    return _ChatLayout(text, ids, offsets, (start, end), inside[0], stop)


def tokenize_chat(tokenizer, messages: list[dict]) -> dict:
    """input_ids and labels for one conversation, with the model's own chat template; labels are IGNORE_INDEX on
    every token except those of the final assistant turn: its text (located by character offsets in the rendered
    conversation, so a tokenizer that merges the template's last characters into the answer's first token is
    handled) and the first end-of-turn token after it (kvlib.engine.models.end_of_turn_ids: eos, <|im_end|>,
    <|eot_id|>, ...) with whatever the template writes between them. What a template writes after that token
    (ChatML's newline, the space Mistral-7B-Instruct-v0.1 writes after `</s>`) is not the answer and carries no
    loss. A system turn the template refuses opens the first user turn instead (kvlib.engine.models.fit_to_template)."""
    layout = _chat_layout(tokenizer, messages)
    ids = layout.input_ids
    labels = [t if layout.first <= i <= layout.stop else IGNORE_INDEX for i, t in enumerate(ids)]
    return {"input_ids": ids, "labels": labels}


class ChatDataset:
    """Pre-tokenized conversations (a plain sequence; Trainer only needs __len__/__getitem__)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def collate(pad_token_id: int):
    """Right-pad a batch (training uses position ids 0..n, so padding goes after the tokens)."""
    import torch

    def fn(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def build_dataset(tokenizer, chats: list[list[dict]], max_length: int, source: str) -> ChatDataset:
    examples = [tokenize_chat(tokenizer, msgs) for msgs in chats]
    too_long = [i + 1 for i, ex in enumerate(examples) if len(ex["input_ids"]) > max_length]
    if too_long:
        raise ValueError(f"{source}: {len(too_long)} examples exceed max_length={max_length} tokens "
                         f"(lines {too_long[:10]}{'...' if len(too_long) > 10 else ''}); never truncated")
    return ChatDataset(examples)


# ---------------------------------------------------------------- token-level loss (paper Fig. 4)

TOKEN_KINDS = ("format", "key", "value")


def _answer_token_kinds(tokenizer, messages: list[dict], meta: dict) -> list[str]:
    """The kind of each token that carries loss in tokenize_chat(tokenizer, messages), by the characters of the
    rendered conversation it covers: "value" (the value or the dictionary name, what retrieval must find), "key"
    (the key, copied from the question) or "format" (everything else, the end-of-turn token included). Offsets
    come from the rendered text, so a tokenizer that encodes the answer differently inside the template than alone
    (SentencePiece's word-initial space, absent after Mistral's `[/INST]`) is classified right."""

    layout = _chat_layout(tokenizer, messages)
    start, end = layout.answer_span
    answer = layout.text[start:end]
    spans = {"key": [], "value": []}
    for kind, needle in (("key", str(meta.get("key", ""))), ("value", str(meta.get("value", ""))),
                         ("value", str(meta.get("gold_dict_name", "")))):
        if needle:
            # whole numbers only: key 97 must not match inside value 975
            spans[kind] += [(start + m.start(), start + m.end())
                            for m in re.finditer(rf"(?<![0-9]){re.escape(needle)}(?![0-9])", answer)]
    kinds = []
    for a, b in layout.offsets[layout.first:layout.stop + 1]:
        kind = "format"
        for k in ("value", "key"):  # a token spanning both counts as value
            if any(a < e and s < b for s, e in spans[k]):
                kind = k
                break
        kinds.append(kind)
    return kinds


def answer_token_losses(model_spec: str, samples, label: str, dtype: str = "float32") -> list[dict]:
    """Per-token cross-entropy (nats) on each sample's answer, tokenized and masked exactly as in training
    (`tokenize_chat`: the model's chat template, loss on the final assistant turn only), one row per answer
    token with its kind (`_answer_token_kinds`). The paper's Fig. 4: with the answer template the formatting
    tokens are predictable, so the loss (and the gradient) concentrates on the value."""
    import torch


    model, tokenizer = models.load_model(model_spec, dtype=dtype)
    work = meter.Work("loglikelihood", {"backend": "hf", "numerics": dtype, "device": model.device.type,
                                        "machine": meter.machine(str(model.device)),
                                        "parameters": sum(p.numel() for p in model.parameters())})
    rows = []
    with torch.inference_mode():
        for s in samples:
            ex = tokenize_chat(tokenizer, s.messages())
            ids = torch.tensor([ex["input_ids"]], device=model.device)
            work.prompts += 1
            work.prompt_tokens += ids.shape[1]
            work.add("prefill", ids.shape[1], meter.attention_pairs(0, ids.shape[1]))
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(ex["labels"][1:], device=model.device)
            keep = targets != IGNORE_INDEX
            losses = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none").tolist()
            answer_ids = targets[keep].tolist()
            kinds = _answer_token_kinds(tokenizer, s.messages(), s.meta)
            for i, (tok, loss, kind) in enumerate(zip(answer_ids, losses, kinds)):
                rows.append({"model": label, "id": s.meta["id"], "template": s.meta["template"], "index": i,
                             "token": tokenizer.decode([tok]), "kind": kind, "loss": loss})
    work.done()
    del model
    return rows


# ---------------------------------------------------------------- model

def resolve_precision(precision: str, cuda: bool) -> str:
    """The precision a TrainConfig.precision trains in: "auto" is bf16 mixed precision on CUDA, fp32 on a CPU."""
    return "bf16" if precision == "bf16" or (precision == "auto" and cuda) else "fp32"


def load_for_training(cfg: TrainConfig):
    """Model (fp32 master weights; mixed precision is the Trainer's job) and tokenizer, with LoRA applied
    when asked. Seeded first so LoRA's random init is reproducible."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed


    set_seed(cfg.seed)
    path = models.resolve_model(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models._from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", dtype=torch.float32,
                                    attn_implementation="sdpa")  # a gated or missing hub model: ModelAccessError
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"))
    return model, tokenizer


def _training_arguments(cfg: TrainConfig, cuda: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(Path(cfg.out_dir) / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps in transformers 5
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=resolve_precision(cfg.precision, cuda) == "bf16",
        use_cpu=not cuda,
        activation_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        # a progress bar of optimizer steps with each step's loss, whatever transformers' log level (its default
        # hides the bar); `kvlib reproduce` streams it to the terminal, the rendered notebook drops it
        disable_tqdm=False,
        report_to="none",
        remove_unused_columns=False,  # our dataset yields exactly the model inputs
        dataloader_num_workers=0,
        optim="adamw_torch",  # the same optimizer on every device (fused AdamW is CUDA-only)
    )


# ---------------------------------------------------------------- running

def run_identity(cfg: TrainConfig) -> dict:
    """What makes two runs the same run: the config and the bytes of its training file."""

    train_file = Path(cfg.train_file)
    return {"config_sha256": config_hash(cfg),
            "train_file_sha256": file_sha256(train_file) if train_file.is_file() else None}


def is_finished(cfg: TrainConfig, identity: dict | None = None) -> bool:
    """True when out_dir holds a finished run of this exact config and training file (a regenerated
    dataset with other contents at the same path is a new run). `identity`: run_identity(cfg), if known."""
    path = Path(cfg.out_dir) / SUMMARY_FILE
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    identity = identity or run_identity(cfg)
    return (summary.get("config_sha256") == identity["config_sha256"]
            and summary.get("train_file_sha256") == identity["train_file_sha256"])


def checkpoints_belong_to(cfg: TrainConfig, identity: dict | None = None) -> bool:
    """True when out_dir's checkpoints were written by this config on this training file. Directories from
    before run_identity.json existed are judged by their train_config.json (the config only)."""
    out = Path(cfg.out_dir)
    if (out / IDENTITY_FILE).is_file():
        return json.loads((out / IDENTITY_FILE).read_text()) == (identity or run_identity(cfg))
    if (out / "train_config.json").is_file():
        written = json.loads((out / "train_config.json").read_text())
        return _identity_fields(written) == _identity_fields(json.loads(json.dumps(to_mapping(cfg))))
    return False


def _checkpoint_is_complete(path: Path) -> bool:
    # Trainer writes trainer_state.json last (after weights, optimizer and RNG states): a process killed while
    # saving leaves a directory without it, or with it cut short, and resuming from that one would fail.
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_dirs(cfg: TrainConfig) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) Trainer checkpoints in out_dir/checkpoints, each by step."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    ckpt_dir = Path(cfg.out_dir) / "checkpoints"
    steps = {}  # checkpoint directory -> its step, from Trainer's `<prefix>-<step>` name
    for path in ckpt_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if ckpt_dir.is_dir() else []:
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if path.is_dir() and step.isdigit():
            steps[path] = int(step)
    complete, incomplete = [], []
    for path in sorted(steps, key=steps.get):
        (complete if _checkpoint_is_complete(path) else incomplete).append(path)
    return complete, incomplete


def last_checkpoint(cfg: TrainConfig) -> str | None:
    """The newest complete checkpoint (one cut short by a kill while saving is passed over)."""
    complete, _ = checkpoint_dirs(cfg)
    return str(complete[-1]) if complete else None


def _text_progress_bar(trainer: Any) -> None:
    """The text bar of optimizer steps (stderr), in a notebook kernel too: there transformers draws an HTML table
    instead, which reaches no terminal (`kvlib reproduce` streams the kernel's stderr) and stays in the report."""
    from transformers.trainer_callback import ProgressCallback

    try:
        from transformers.utils.notebook import NotebookProgressCallback
    except ImportError:  # no IPython: transformers never chose it
        return
    if any(isinstance(cb, NotebookProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(NotebookProgressCallback)
        trainer.add_callback(ProgressCallback)


def train(cfg: TrainConfig, resume: bool | Literal["auto"] = "auto", callbacks: list | None = None) -> dict:
    """Run (or resume, or reuse) one finetuning run; returns the summary.

    resume: "auto" continues from the last checkpoint if there is one of this run (pipelines; checkpoints of
    another config or training file are discarded: run_identity); True requires one (`kvlib train --resume`);
    False refuses to start over existing checkpoints.
    """
    import torch
    from transformers import Trainer


    out = Path(cfg.out_dir)
    identity = run_identity(cfg)  # hashes the training file once for every check below and the summary
    if is_finished(cfg, identity):
        return read_summary(out)
    ckpt = last_checkpoint(cfg)
    if ckpt is not None and not checkpoints_belong_to(cfg, identity):
        if resume == "auto":  # pipelines: nothing of this run to continue, so start it afresh
            print(f"kvlib train: {out / 'checkpoints'} holds checkpoints of another config or training file; "
                  f"starting this run over", flush=True)
            shutil.rmtree(out / "checkpoints")
            (out / SUMMARY_FILE).unlink(missing_ok=True)
            ckpt = None
        elif resume is True:
            raise ParamError(f"out_dir: --resume given but the checkpoints in {out / 'checkpoints'} are of another "
                             f"config or training file ({IDENTITY_FILE} differs)")
    for partial in checkpoint_dirs(cfg)[1]:  # a save cut short: Trainer would write that step's again into it
        print(f"kvlib train: removing {partial} (its save was interrupted)", flush=True)
        shutil.rmtree(partial)
    if resume is True and ckpt is None:
        raise ParamError(f"out_dir: --resume given but {out / 'checkpoints'} holds no checkpoint")
    if resume is False and ckpt is not None:
        raise ParamError(f"out_dir: {out} already holds checkpoints ({Path(ckpt).name}); pass --resume to "
                         f"continue that run, or choose another out_dir")
    chats = read_chat_file(Path(cfg.train_file))
    cuda = torch.cuda.is_available()
    model, tokenizer = load_for_training(cfg)
    max_length = cfg.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
    dataset = build_dataset(tokenizer, chats, max_length, cfg.train_file)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(to_mapping(cfg), indent=2, sort_keys=True) + "\n")
    (out / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")

    trainer = Trainer(model=model, args=_training_arguments(cfg, cuda), train_dataset=dataset,
                      data_collator=collate(tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=callbacks)
    _text_progress_bar(trainer)
    device = "cuda" if cuda else "cpu"
    work = meter.Work("train", {"numerics": resolve_precision(cfg.precision, cuda), "device": device,
                                "machine": meter.machine(device), "method": cfg.method,
                                "parameters": sum(p.numel() for p in model.parameters())})
    t0 = time.time()
    trainer.train(resume_from_checkpoint=ckpt if resume else None)
    wall = time.time() - t0
    _count_training(work, dataset, trainer, int(Path(ckpt).name.rsplit("-", 1)[-1]) if ckpt and resume else 0)

    model_dir = save_final_model(cfg, trainer)
    if not trainer.is_world_process_zero():  # under accelerate/torchrun only rank 0 writes reports
        return {}
    work.done()
    write_loss_csv(trainer.state.log_history, out / LOSS_FILE)
    n_answer = sum(sum(1 for x in ex["labels"] if x != IGNORE_INDEX) for ex in dataset.examples)
    summary = {
        "config": to_mapping(cfg),
        **identity,
        "base_model": models.model_identity(cfg.model),
        "model_dir": str(model_dir),
        "n_examples": len(dataset),
        "n_tokens": sum(len(ex["input_ids"]) for ex in dataset.examples),
        "n_answer_tokens": n_answer,
        "global_steps": trainer.state.global_step,
        "final_train_loss": mean_train_loss(trainer.state.log_history),
        "precision": resolve_precision(cfg.precision, cuda),
        "device": "cuda" if cuda else "cpu",
        "resumed_from": Path(ckpt).name if (ckpt and resume) else None,
        "wall_seconds_this_session": round(wall, 1),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if not cfg.keep_checkpoints:  # after the summary: a crash before this leaves a resumable run, not a lost one
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


def _count_training(work: meter.Work, dataset: ChatDataset, trainer, first_step: int) -> None:
    """The sequences this session trained on (`work`): its optimizer steps (from `first_step`, a resumed
    checkpoint's) x the global batch, each with the mean tokens and attention pairs of the training data (forward
    and backward: what the training rate is fitted on)."""
    args = trainer.args
    sequences = ((trainer.state.global_step - first_step) * args.per_device_train_batch_size
                 * args.gradient_accumulation_steps * args.world_size)
    lengths = [len(ex["input_ids"]) for ex in dataset.examples]
    work.prompts = sequences
    work.prompt_tokens = round(sequences * sum(lengths) / len(lengths))
    work.add("train", work.prompt_tokens,
             round(sequences * sum(meter.attention_pairs(0, n) for n in lengths) / len(lengths)))


def save_final_model(cfg: TrainConfig, trainer) -> Path:
    """Save what evaluation loads by path: full weights, a LoRA adapter (base = cfg.model, a spec
    kvlib.engine.models resolves anywhere) or the merged LoRA model. `trainer.save_model` gathers FSDP/DeepSpeed
    shards and writes on the main process only, with the tokenizer."""
    model_dir = Path(cfg.out_dir) / "model"
    model = trainer.model
    if cfg.method == "lora" and cfg.merge_lora:
        if trainer.is_world_process_zero():  # merging needs the whole model in one process (no FSDP)
            merged = model.merge_and_unload()
            merged.save_pretrained(model_dir)
            trainer.processing_class.save_pretrained(model_dir)
        return model_dir
    if cfg.method == "lora":
        model.peft_config["default"].base_model_name_or_path = cfg.model
    trainer.save_model(str(model_dir))
    return model_dir


def mean_train_loss(log_history: list[dict]) -> float:
    """The training loss averaged over every optimizer step of the run, from the trainer's log (each logged loss
    weighted by the steps since the previous one). Not TrainOutput.training_loss: transformers averages that over
    the steps of the last `train()` call only, so a run resumed from a checkpoint would report another number."""
    total, last_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last_step)
            last_step = entry["step"]
    if last_step == 0:
        raise ValueError("log_history: no training loss was logged")
    return total / last_step


def read_summary(out_dir: str | Path) -> dict:
    """A finished run's train_summary.json, its final_train_loss taken from the run's loss.csv (the whole run's
    mean, `mean_train_loss`): summaries written before that rule hold transformers' mean over the last resumed
    part only. The file itself is left as it is, because the held-out check's cache key hashes it."""
    out = Path(out_dir)
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    loss_csv = out / LOSS_FILE
    if loss_csv.is_file():
        with loss_csv.open(newline="") as fh:
            summary["final_train_loss"] = mean_train_loss(
                [{"step": int(row["step"]), "loss": float(row["loss"])} for row in csv.DictReader(fh)])
    return summary


def write_loss_csv(log_history: list[dict], path: Path) -> None:
    rows = [h for h in log_history if "loss" in h]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["step", "epoch", "loss", "learning_rate", "grad_norm"])
        for h in rows:
            w.writerow([h.get("step"), h.get("epoch"), h.get("loss"), h.get("learning_rate"), h.get("grad_norm")])


# ---------------------------------------------------------------- dry run

def plan_training(cfg: TrainConfig, world: int | None = None) -> dict:
    """Validate the plan without loading weights: data format, token lengths, optimizer steps, and a
    memory estimate from the architecture (instantiated on the meta device: no memory, exact sizes).
    `world`: the number of GPUs (processes) it runs on (default: cfg.dry_run_num_gpus)."""
    chats = read_chat_file(Path(cfg.train_file))
    lengths, how = _dry_run_lengths(cfg, chats)
    n_params, context, arch = _dry_run_architecture(cfg)
    max_length = cfg.max_length or context
    too_long = sum(1 for n in lengths if n > max_length)
    if too_long:
        raise ValueError(f"train_file: {too_long} of {len(lengths)} examples exceed {max_length} tokens")
    world = world or cfg.dry_run_num_gpus
    steps_per_epoch = math.ceil(len(chats) / (cfg.per_device_batch_size * world * cfg.gradient_accumulation_steps))
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    plan = {
        "train_file": cfg.train_file, "n_examples": len(chats), "token_lengths_from": how,
        "max_tokens": max(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1), "max_length": max_length,
        "architecture": arch, "n_params": n_params, "method": cfg.method,
        "global_batch": cfg.global_batch_size * world, "optimizer_steps": steps,
        "memory_gib": memory_estimate_gib(cfg, n_params, max(lengths), arch, world),
    }
    return plan


def _dry_run_lengths(cfg: TrainConfig, chats: list[list[dict]]) -> tuple[list[int], str]:
    """Exact lengths with the model's tokenizer and chat template when it is local; otherwise the
    configured token counter plus a fixed per-message allowance for the template's markers."""

    tokenizer = None
    local = Path(models.resolve_model(cfg.model)).is_dir()
    if local or not cfg.dry_run_tokenizer:  # a hub id with a fallback counter: don't wait on the network
        try:
            tokenizer = models.load_tokenizer(cfg.model)
        except Exception:  # hub unreachable: fall back to the offline counter below
            tokenizer = None
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return [len(tokenize_chat(tokenizer, m)["input_ids"]) for m in chats], f"{cfg.model} chat template"
    if not cfg.dry_run_tokenizer:
        raise ParamError(f"dry_run_tokenizer: the tokenizer of {cfg.model!r} is not available offline; name a "
                         f"token counter (e.g. mistral-7b-v0.1) to measure lengths")
    counter = models.load_token_counter(cfg.dry_run_tokenizer)
    texts = [m["content"] for chat in chats for m in chat]
    counts = iter(counter.count(texts))
    per_message = 8  # generous allowance for [INST]/[/INST]/<s>/</s>-style markers
    return [sum(next(counts) + per_message for _ in chat) for chat in chats], f"{cfg.dry_run_tokenizer} + template allowance"


def _dry_run_architecture(cfg: TrainConfig) -> tuple[int, int, dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM


    try:
        if cfg.dry_run_model_config:
            fields = json.loads(Path(cfg.dry_run_model_config).read_text())
            fields = {k: v for k, v in fields.items() if not k.startswith("_")}
            hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        else:
            hf_config = AutoConfig.from_pretrained(models.resolve_model(cfg.model))
    except Exception as exc:
        raise ParamError(f"dry_run_model_config: cannot read the architecture of {cfg.model!r} offline ({exc}); "
                         f"point dry_run_model_config at a local config.json") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    n_params = sum(p.numel() for p in model.parameters())
    arch = {k: getattr(hf_config, k, None) for k in
            ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "max_position_embeddings")}
    return n_params, int(hf_config.max_position_embeddings), arch


def memory_estimate_gib(cfg: TrainConfig, n_params: int, seq_len: int, arch: dict, world: int) -> dict:
    """Rough per-GPU memory for training (GiB). Full finetuning with AdamW and mixed precision keeps
    fp32 weights + fp32 grads + two fp32 Adam moments (16 bytes/parameter), sharded across GPUs by
    FSDP/ZeRO-3; LoRA keeps frozen bf16 weights (2 bytes/parameter) and states for ~1% trainable ones.
    Activations: ~ 34 * hidden * seq bytes per layer per sample (Korthikanti et al. 2022, no recompute);
    gradient checkpointing keeps ~ 2 * hidden * seq per layer."""
    gib = 1024 ** 3
    if cfg.method == "full":
        states = 16 * n_params / world
    else:
        states = 2 * n_params + 16 * 0.01 * n_params
    hidden, layers = arch.get("hidden_size") or 0, arch.get("num_hidden_layers") or 0
    per_layer = (2 if cfg.gradient_checkpointing else 34) * hidden * seq_len * cfg.per_device_batch_size
    activations = per_layer * layers
    return {"weights_grads_optimizer": round(states / gib, 1), "activations": round(activations / gib, 1),
            "total_per_gpu": round((states + activations) / gib, 1), "gpus": world}


# ---------------------------------------------------------------- does it fit the GPUs

# share of a GPU's memory a run may plan to fill: the estimate leaves out the CUDA context, the allocator's
# fragmentation and the logits, so a run planned at 100% would still run out
GPU_HEADROOM = 0.9


def visible_gpus_gib() -> list[float]:
    """Total memory (GiB) of each CUDA device this process sees (torch.cuda), [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory / 1024 ** 3 for i in range(torch.cuda.device_count())]


def check_fits_gpus(cfg: TrainConfig, processes: int, gpus_gib: list[float] | None = None, where: str = "",
                    plan: dict | None = None) -> dict:
    """The run's memory plan on `processes` GPUs (plan_training's), checked against the visible GPUs
    (`gpus_gib`, default visible_gpus_gib()): too few GPUs, or an estimate per GPU above GPU_HEADROOM of the
    smallest one, raises ParamError with the numbers and what would fit (another process count, gradient
    checkpointing, LoRA). Returns the plan."""
    gpus = visible_gpus_gib() if gpus_gib is None else list(gpus_gib)
    plan = plan or plan_training(cfg, world=processes)
    need = plan["memory_gib"]["total_per_gpu"]
    used = sorted(gpus, reverse=True)[:processes]
    if len(used) == processes and need <= GPU_HEADROOM * min(used):
        return plan

    def per_gpu(c: TrainConfig, world: int) -> float:
        return memory_estimate_gib(c, plan["n_params"], plan["max_tokens"], plan["architecture"], world)["total_per_gpu"]

    memory = plan["memory_gib"]
    seen = (f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} x {', '.join(f'{g:.1f}' for g in gpus)} GiB" if gpus
            else "no CUDA GPU (torch.cuda.device_count() == 0)")
    fixes = [f"run on {processes} GPU{'s' if processes != 1 else ''} with at least {need / GPU_HEADROOM:.1f} GiB each"]
    if gpus:
        fitting = [w for w in range(1, len(gpus) + 1)
                   if per_gpu(cfg, w) <= GPU_HEADROOM * min(sorted(gpus, reverse=True)[:w])]
        if fitting and fitting[0] != processes:
            fixes.append(f"set launcher: {{kind: accelerate, num_processes: {fitting[0]}}} in 02_finetune "
                         f"({per_gpu(cfg, fitting[0]):.1f} GiB per GPU on {fitting[0]})")
    if not cfg.gradient_checkpointing:
        fixes.append(f"gradient_checkpointing: true ({per_gpu(replace(cfg, gradient_checkpointing=True), processes):.1f} "
                     f"GiB per GPU)")
    if cfg.method == "full":
        fixes.append(f"method: lora ({per_gpu(replace(cfg, method='lora'), processes):.1f} GiB per GPU)")
    prefix = f"{where}: " if where else ""
    raise ParamError(
        f"{prefix}training {cfg.model} does not fit the visible GPUs: it needs about {need:.1f} GiB on each of "
        f"{processes} GPU{'s' if processes != 1 else ''} (weights, gradients and AdamW states "
        f"{memory['weights_grads_optimizer']:.1f} GiB + activations {memory['activations']:.1f} GiB for "
        f"{cfg.per_device_batch_size} x {plan['max_tokens']} tokens; kvlib.engine.train.memory_estimate_gib), planned "
        f"at most {GPU_HEADROOM:.0%} of a GPU's memory; visible: {seen}. Fix: " + "; or ".join(fixes))


# ---------------------------------------------------------------- notebook 02


# ---------------------------------------------------------------- CLI

def main_cli(params: Path, out: str | None = None, resume: bool | Literal["auto"] = False,
             dry_run: bool = False) -> int:
    cfg = config_from_file(params, {"out_dir": out} if out else None)
    if dry_run:
        print(json.dumps(plan_training(cfg), indent=2))
        return 0
    summary = train(cfg, resume=resume)
    if not summary:  # another rank than 0 under accelerate/torchrun: rank 0 reports
        return 0
    print(f"trained {summary['global_steps']} steps on {summary['n_examples']} examples "
          f"(final train loss {summary['final_train_loss']:.4f}); model saved to {summary['model_dir']}")
    return 0
