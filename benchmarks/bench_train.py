"""Per-step training time of the embedded model, every lever as a ratio against a bare fp32
forward + backward + AdamW loop, all measured in the same run on the same batches:
- bare loop, fp32 (the baseline) and bf16 autocast (the mixed-precision lever alone);
- `kvlib.engine.train` (transformers Trainer, answer-only loss) in fp32 and bf16: its overhead over the bare loop of
  the same precision (target <= +15%), and its speed against the fp32 baseline;
- what `precision: auto` picks here (fp32 on a CPU, bf16 on CUDA).
Batch 1, synthetic simple-task prompts of about --tokens tokens; the first --warmup steps of each are not
timed; medians.

    python benchmarks/bench_train.py [--tokens 1024] [--steps 6] [--warmup 2] [--bf16 auto|yes|no]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from kvlib.tasks import synthetic as gen
from kvlib.engine import models
from kvlib.engine import train
from kvlib.engine.config import from_mapping
from bf16_option import add_bf16_option, bf16_timed
from readme_section import add_update_option, check, text_block, write


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t0)


def make_data(tmp: Path, tokens: int, n: int) -> Path:
    """n samples of the simple task sized to about `tokens` prompt tokens (dictionary count scaled)."""
    counter = models.load_token_counter(models.DEFAULT_MODEL)
    num_dicts = max(2, round(tokens / 51))  # ~51 tokens per dictionary line with 3-4 digit numbers
    cfg = gen.GenerationConfig(num_dicts=num_dicts, n_train=n, n_eval=0, max_tokens=tokens + 300)
    samples = gen.generate(cfg, counter.count)["train"]
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": s.messages()}) + "\n" for s in samples))
    return path


def time_kvlib(train_file: Path, out: Path, steps: int, precision: str) -> list[float]:
    cfg = from_mapping(train.TrainConfig, dict(
        train_file=str(train_file), out_dir=str(out), max_steps=steps, gradient_accumulation_steps=1,
        learning_rate=1e-5, precision=precision, save_steps=10**6, logging_steps=1))
    timer = StepTimer()
    train.train(cfg, resume=False, callbacks=[timer])
    return timer.times


def time_bare(train_file: Path, steps: int, precision: str) -> list[float]:
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    chats = train.read_chat_file(train_file)
    model = AutoModelForCausalLM.from_pretrained(models.resolve_model(models.DEFAULT_MODEL), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    batches = [train.collate(tokenizer.pad_token_id)([train.tokenize_chat(tokenizer, c)]) for c in chats]
    times = []
    for i in range(steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    add_bf16_option(parser)
    add_update_option(parser)
    args = parser.parse_args()
    check(parser, args.update, "bench_train")
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    torch.manual_seed(0)
    with_bf16, not_timed = bf16_timed(args.bf16)
    timed = ("fp32", "bf16") if with_bf16 else ("fp32",)
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = make_data(Path(tmp), args.tokens, args.steps)
        for precision in timed:
            medians[f"bare loop, {precision}"] = statistics.median(
                time_bare(train_file, args.steps, precision)[args.warmup:])
            medians[f"kvlib train, {precision}"] = statistics.median(
                time_kvlib(train_file, Path(tmp) / f"run-{precision}", args.steps, precision)[args.warmup:])
    auto = train.resolve_precision("auto", torch.cuda.is_available())
    baseline = medians["bare loop, fp32"]
    lines = [f"embedded model, ~{args.tokens}-token samples, batch 1, median of {args.steps - args.warmup} timed "
             f"steps, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"{'':26s} {'s/step':>7s} {'vs bare fp32':>13s}"]
    lines += [f"{label:26s} {seconds:7.2f} {baseline / seconds:12.2f}x" for label, seconds in medians.items()]
    if not_timed:
        lines.append(not_timed)
    for precision in timed:
        overhead = medians[f"kvlib train, {precision}"] / medians[f"bare loop, {precision}"] - 1
        lines.append(f"kvlib overhead over the bare loop, {precision}: {100 * overhead:+.1f}% (target <= +15%)")
    if f"kvlib train, {auto}" in medians:
        lines.append(f"precision auto picks {auto} here: kvlib train {baseline / medians[f'kvlib train, {auto}']:.2f}x "
                     f"the bare fp32 loop")
    print("\n".join(lines))
    write(args.update, "bench_train", text_block(lines))

if __name__ == "__main__":
    main()
