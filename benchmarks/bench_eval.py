"""MDQA answering speed of kvlib's HF backend, each lever against today's float32 path in the same run.

Prompts: --questions MDQA questions of the derived random-distractor setting with --documents documents, each
with the gold at every one of --positions (as the MDQA notebooks ask them), LitM's prompt through the chat
template; greedy, at most --new-tokens new tokens. Every configuration answers every question in turn (the
configurations interleaved question by question, so that load from other processes on a shared host falls on
all of them alike):
- baseline: today's float32 path, transformers' generate() (decoder "generate"; on a CPU long prompts go one
  at a time), whole replies;
- + kvlib decoder: each prompt prefilled alone, rows decoded together in a preallocated KV cache;
- + stop rule: decoding ends where LitM's metric stops reading (the first line);
- + prefix reuse: prompts in token order, each prefilling only what follows the prefix it shares with the
  previous one, whose attention covers only its own rows;
- the same in bfloat16 (a dtype a profile must state; its answers are compared with float32's).
Printed per configuration: wall time and this process's CPU time (which leaves out the time other processes
held the cores: with --threads 1 the steadier measure on a shared host), each as a ratio to the baseline;
answers identical to the baseline's; decoding's cost per new token per prompt (decode-step wall time over
the rows it advanced). Then one prompt's
prefill measured op by op: the linear layers' achieved GFLOP/s against the rate the same GEMM shapes reach
alone in this run, and attention's. Goals: >= 1.6x with identical float32 answers; >= 2.5x in bfloat16 with
>= 97% of answers equal to float32's; decoding <= 30 ms per new token per prompt in float32.

With --update README.md the same results, as Markdown, replace the README's benchmark section (between its
`bench_eval` markers): `make bench` does that.

    python benchmarks/bench_eval.py [--quick] [--questions 4] [--positions 1,5,10,15,20] [--documents 20]
                                    [--new-tokens 32] [--batch-size 8] [--threads N] [--llama] [--bf16 auto|yes|no]
                                    [--update README.md]
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from kvlib.engine import models
from kvlib.engine.backends import HFBackend, OpenAIChatBackend, _KVCache, _kvlib_attention, _Layout, cpu_supports_bf16
from kvlib.tasks import mdqa
from kvlib.tasks.mdqa import MDQA_ANSWER_END
from bf16_option import add_bf16_option, bf16_timed
from readme_section import add_update_option, check, write


def mdqa_prompts(n: int, documents: int, positions: list[int]) -> list[list[str]]:
    """The prompts of each of `n` questions, one per gold position."""
    (eval_set,) = mdqa.build_eval_sets(["random"], documents, n, question_seed=0, distractor_seed=0).values()
    return [[prompt for _, prompt in mdqa.position_prompts(e, positions)] for e in eval_set.examples]


class ForwardTimer:
    """Wall time of the model's forward passes, split into prefill (more than one new token per row) and
    decode steps (one per row), with the rows each decode step advanced."""

    def __init__(self, model: Any):
        self.prefill_s = self.decode_s = 0.0
        self.decode_rows = 0
        self._start = 0.0
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        seconds = time.perf_counter() - self._start
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            self.decode_s += seconds
            self.decode_rows += ids.shape[0]
        else:
            self.prefill_s += seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# label, dtype, decoder, stop rule, prefix reuse, threads (None: the run's)
CONFIGS = [
    ("baseline: float32, generate(), whole replies", "float32", "generate", False, False, None),
    ("+ kvlib decoder", "float32", "kvlib", False, False, None),
    ("+ stop rule (first line)", "float32", "kvlib", True, False, None),
    ("+ prefix reuse (all float32 levers)", "float32", "kvlib", True, True, None),
    ("all levers, bfloat16", "bfloat16", "kvlib", True, True, None),
]
ONE_THREAD = ("all float32 levers + threads: 1", "float32", "kvlib", True, True, 1)
ALL_FLOAT32 = CONFIGS[3][0]


def run_configs(questions: list[list[str]], new_tokens: int, batch_size: int) -> dict[str, dict]:
    backends = {dtype: HFBackend(models.DEFAULT_MODEL, dtype=dtype, batch_size=batch_size, progress=False)
                for dtype in sorted({c[1] for c in CONFIGS})}
    for backend in backends.values():  # warm up (first-call allocations, kernel selection)
        backend.generate(["Hello"], 2)
    results = {label: {"seconds": 0.0, "cpu_s": 0.0, "answers": [], "prefill_s": 0.0, "decode_s": 0.0,
                       "decode_rows": 0} for label, *_ in CONFIGS}
    for q, prompts in enumerate(questions):
        for label, dtype, decoder, stop, prefix, threads in CONFIGS:
            backend = backends[dtype]
            backend.decoder, backend.prefix_cache, backend.threads = decoder, prefix, threads
            timer = ForwardTimer(backend._decoder_model() if decoder == "kvlib" else backend.model)
            start, cpu = time.perf_counter(), time.process_time()
            answers = backend.generate(prompts, new_tokens, stop=MDQA_ANSWER_END if stop else None)
            seconds = time.perf_counter() - start
            timer.remove()
            r = results[label]
            r["seconds"] += seconds
            r["cpu_s"] += time.process_time() - cpu
            r["answers"] += answers if stop else [MDQA_ANSWER_END.apply(a) for a in answers]
            r["prefill_s"] += timer.prefill_s
            r["decode_s"] += timer.decode_s
            r["decode_rows"] += timer.decode_rows
            print(f"  question {q + 1}/{len(questions)}: {label}: {seconds:.1f} s", flush=True)
    return results


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of one (m x k) @ (k x n) linear layer alone (best of `repeats`)."""
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(a, w)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def prefill_breakdown(backend: HFBackend, prompt: str) -> dict:
    """One prompt's prefill (kvlib's decoder, from scratch) op by op: time and FLOPs of the linear layers and
    of attention, and the rate the same linear shapes reach alone."""
    from torch.profiler import ProfilerActivity, profile


    (ids,) = backend._encode_prompts([prompt])
    model = backend._decoder_model()
    config = model.config
    shapes: dict[tuple[int, int, int], list[float]] = {}

    def pre(module, args):
        module._kvlib_start = time.perf_counter()

    def post(module, args, output):
        x = args[0]
        m = x.numel() // x.shape[-1]
        shapes.setdefault((m, module.in_features, module.out_features), []).append(
            time.perf_counter() - module._kvlib_start)

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    handles = [h for m in linears for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    cache = _KVCache(1, len(ids))
    with torch.inference_mode(), _kvlib_attention(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        backend._step(model, [ids], [list(range(len(ids)))], cache, _Layout(past=0))
        total_s = time.perf_counter() - start
    for h in handles:
        h.remove()
    attention_s = sum(e.self_cpu_time_total for e in prof.key_averages()
                      if "scaled_dot_product" in e.key) / 1e6
    linear_s = sum(sum(v) for v in shapes.values())
    linear_flop = sum(2 * m * k * n * len(v) for (m, k, n), v in shapes.items())
    # the GEMM rate of the same shapes alone, weighted by their FLOPs: the ceiling the linear layers could reach
    alone_s = sum(2 * m * k * n * len(v) / (gemm_rate(m, k, n, model.dtype) * 1e9) for (m, k, n), v in shapes.items())
    n = len(ids)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # causal: query i attends to i + 1 keys; QK^T and PV are 2 FLOPs per multiply-add each
    attention_flop = config.num_hidden_layers * heads * head_dim * 4 * n * (n + 1) / 2
    return {"tokens": n, "total_s": total_s, "linear_s": linear_s, "linear_gflops": linear_flop / linear_s / 1e9,
            "gemm_gflops": linear_flop / alone_s / 1e9, "attention_s": attention_s,
            "attention_gflops": attention_flop / attention_s / 1e9}


def bf16_gemm_speedup(size: int = 1024) -> float:
    """float32 time / bfloat16 time of one (size x size) linear layer here: printed beside the results, read by
    nothing (kvlib's numerics are the params' dtype, whatever this says)."""
    return gemm_rate(size, size, size, torch.bfloat16, repeats=5) / gemm_rate(size, size, size, torch.float32, repeats=5)


def summarize(results: dict[str, dict], n_prompts: int) -> tuple[list[dict], list[str]]:
    """One row per configuration (ratios against the baseline, answers against float32) and the goal lines."""
    base, float32_all = results[CONFIGS[0][0]], results[ALL_FLOAT32]
    rows = []
    for label, dtype, *_ in CONFIGS:
        r = results[label]
        reference = base if dtype == "float32" else float32_all
        rows.append({"configuration": label, "dtype": dtype, "wall_s": r["seconds"],
                     "s_per_prompt": r["seconds"] / n_prompts, "speedup": base["seconds"] / r["seconds"],
                     "cpu_speedup": base["cpu_s"] / r["cpu_s"],
                     "same": sum(a == b for a, b in zip(r["answers"], reference["answers"])),
                     "decode_ms": 1e3 * r["decode_s"] / r["decode_rows"] if r["decode_rows"] else float("nan")})
    best = max((r for r in rows if r["dtype"] == "float32"), key=lambda r: r["speedup"])
    identical = sum(a == b for a, b in zip(float32_all["answers"], base["answers"]))
    goals = [f"float32, all levers vs baseline: {base['seconds'] / float32_all['seconds']:.2f}x "
             f"({best['speedup']:.2f}x at best), {identical}/{n_prompts} answers identical (goal >= 1.6x, all identical)"]
    bf16 = next((results[c[0]] for c in CONFIGS if c[1] == "bfloat16"), None)
    if bf16 is not None:
        agree = sum(a == b for a, b in zip(bf16["answers"], float32_all["answers"])) / n_prompts
        goals.append(f"bfloat16, all levers vs baseline: {base['seconds'] / bf16['seconds']:.2f}x, "
                     f"{agree:.0%} of answers equal to float32's (goal >= 2.5x, >= 97%)")
    for label in (ALL_FLOAT32, ONE_THREAD[0]):
        if label in results and results[label]["decode_rows"]:
            r = results[label]
            goals.append(f"{label}: decoding {1e3 * r['decode_s'] / r['decode_rows']:.1f} ms per new token per "
                         f"prompt (goal <= 30)")
    return rows, goals


def prefill_line(b: dict, dtype: str) -> str:
    return (f"prefill of one {b['tokens']}-token prompt, {dtype}: {b['total_s']:.2f} s; linear layers "
            f"{b['linear_s']:.2f} s at {b['linear_gflops']:.1f} GFLOP/s (the same GEMMs alone: "
            f"{b['gemm_gflops']:.1f} GFLOP/s, {b['linear_gflops'] / b['gemm_gflops']:.0%}); attention "
            f"{b['attention_s']:.2f} s at {b['attention_gflops']:.1f} GFLOP/s")


def markdown(setup: str, rows: list[dict], n_prompts: int, notes: list[str]) -> str:
    """The README section: what was run, the table, the goal and prefill lines."""
    lines = [setup, "", "| configuration | wall s | s per prompt | vs baseline (wall) | vs baseline (CPU time) | "
             "answers same as float32 | decode ms per new token |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        decode = "" if r["decode_ms"] != r["decode_ms"] else f"{r['decode_ms']:.1f}"
        lines.append(f"| {r['configuration']} | {r['wall_s']:.1f} | {r['s_per_prompt']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['cpu_speedup']:.2f}x | {r['same']}/{n_prompts} | {decode} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one question, 10 documents, 3 gold positions")
    parser.add_argument("--questions", type=int, default=4, help="MDQA questions, each asked at every position")
    parser.add_argument("--positions", default="1,5,10,15,20", help="gold positions, comma-separated")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--llama", action="store_true", help="also time the llama.cpp server (Q4_1 GGUF)")
    add_bf16_option(parser)
    add_update_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.questions, args.documents, args.positions, args.bf16 = 1, 10, "1,5,10", "no"
    check(parser, args.update, "bench_eval")
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() > 1:  # the params' threads lever, when the run has more than one
        CONFIGS.append(ONE_THREAD)
    with_bf16, not_timed = bf16_timed(args.bf16)
    if not with_bf16:
        CONFIGS.remove(next(c for c in CONFIGS if c[1] == "bfloat16"))
    questions = mdqa_prompts(args.questions, args.documents, [int(p) for p in args.positions.split(",")])
    prompts = [p for ps in questions for p in ps]
    counter = HFBackend(models.DEFAULT_MODEL, dtype="float32", progress=False)
    prompt_tokens = sum(counter.prompt_lengths(prompts))
    setup = (f"{len(prompts)} MDQA prompts ({len(questions)} questions x gold positions {args.positions}), "
             f"{args.documents} documents, {prompt_tokens / len(prompts):.0f} prompt tokens each (embedded model), "
             f"<= {args.new_tokens} new tokens, batch {args.batch_size}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, CPU native bf16: {cpu_supports_bf16()}, bf16 GEMM speed-up here: "
             f"{bf16_gemm_speedup():.2f}x")
    print(setup, flush=True)

    results = run_configs(questions, args.new_tokens, args.batch_size)
    rows, goals = summarize(results, len(prompts))
    if not_timed:
        goals.append(not_timed)
    print(f"\n{'configuration':44s} {'wall s':>7s} {'s/prompt':>8s} {'vs base':>8s} {'CPU s':>7s} {'vs base':>8s} "
          f"{'same as base':>12s} {'decode ms/tok':>13s}")
    for r, (label, dtype, *_) in zip(rows, CONFIGS):
        compared = "" if dtype == "float32" else " (vs float32)"
        print(f"{label:44s} {r['wall_s']:7.1f} {r['s_per_prompt']:8.2f} {r['speedup']:7.2f}x "
              f"{results[label]['cpu_s']:7.1f} {r['cpu_speedup']:7.2f}x "
              f"{r['same']:>5d}/{len(prompts):<3d}{compared:14s} {r['decode_ms']:10.1f}")
    if args.llama:
        from kvlib.engine.servers import LlamaServer

        with LlamaServer(models.embedded_gguf_path(models.DEFAULT_MODEL), n_ctx=8192) as server:
            backend = OpenAIChatBackend(server.model, base_url=server.base_url, concurrency=1, progress=False)
            backend.generate(["warm up"], 4)
            start = time.perf_counter()
            answers = backend.generate(prompts, args.new_tokens, stop=MDQA_ANSWER_END)
            seconds = time.perf_counter() - start
        same = sum(a == b for a, b in zip(answers, results[ALL_FLOAT32]["answers"]))
        base_s = results[CONFIGS[0][0]]["seconds"]
        goals.append(f"llama.cpp server (Q4_1 GGUF), one at a time: {seconds:.1f} s, {base_s / seconds:.2f}x, "
                     f"{same}/{len(prompts)} answers equal to float32's")
    print()
    for line in goals:
        print(line)
    for dtype in sorted({c[1] for c in CONFIGS}, reverse=True):  # float32 first
        backend = HFBackend(models.DEFAULT_MODEL, dtype=dtype, progress=False)
        goals.append(prefill_line(prefill_breakdown(backend, prompts[0]), dtype))
        print(goals[-1], flush=True)
        del backend
    write(args.update, "bench_eval", markdown(setup, rows, len(prompts), goals))


if __name__ == "__main__":
    main()
