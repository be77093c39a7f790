"""MDQA answering speed: kvlib's HF backend against a naive one-prompt-at-a-time `generate` loop, and the
llama.cpp server through kvlib's OpenAI-compatible backend, on the same prompts in the same run.

Prompts: --questions MDQA questions of the derived random-distractor setting with --documents documents, each
with the gold at every one of --positions (as the MDQA notebooks ask them), LitM's prompt through the chat
template; greedy, --new-tokens new tokens at most.
- naive: transformers' defaults a user starts from (float32, SDPA), one prompt per `generate` call;
- each kvlib lever alone: float32 batched without a token cap, bfloat16 one at a time; then kvlib's default
  (dtype auto: bf16 only where it measures faster; on a CPU at most CPU_MAX_BATCH_TOKENS padded tokens per
  batch, so long prompts go one at a time);
- llama.cpp: the embedded Q4_1 GGUF behind `python -m llama_cpp.server`, one request at a time.
Target: kvlib default >= 2x the naive loop.

    python benchmarks/bench_eval.py [--questions 3] [--positions 1,10,20] [--documents 20] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from kvlib.tasks import mdqa
from kvlib.engine import models
from kvlib.engine.backends import HFBackend, OpenAIChatBackend, cpu_bf16_speedup, cpu_supports_bf16


def mdqa_prompts(n: int, documents: int, positions: list[int]) -> list[str]:
    (eval_set,) = mdqa.build_eval_sets(["random"], documents, n, question_seed=0, distractor_seed=0).values()
    return [prompt for e in eval_set.examples for _, prompt in mdqa.position_prompts(e, positions)]


def time_naive(prompts: list[str], new_tokens: int, dtype: torch.dtype) -> tuple[float, list[str]]:
    """The loop a user writes first: one prompt per generate() call, stop at eos or max_new_tokens."""
    path = models.resolve_model(models.DEFAULT_MODEL)
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    answers = []
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
            answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return time.perf_counter() - start, answers


def time_backend(backend, prompts: list[str], new_tokens: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = backend.generate(prompts, new_tokens)
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--positions", default="1,10,20", help="gold positions, comma-separated")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-llama", action="store_true", help="skip the llama.cpp server")
    args = parser.parse_args()
    prompts = mdqa_prompts(args.questions, args.documents, [int(p) for p in args.positions.split(",")])
    counter = HFBackend(models.DEFAULT_MODEL, dtype="float32", progress=False)
    prompt_tokens = sum(counter.prompt_lengths(prompts))
    del counter
    print(f"{len(prompts)} MDQA prompts, {args.documents} documents, {prompt_tokens / len(prompts):.0f} prompt "
          f"tokens each (embedded model), <= {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"CPU native bf16: {cpu_supports_bf16()}, bf16 matmul speed-up here: {cpu_bf16_speedup():.2f}x")

    results = {}
    results["naive loop, float32"] = time_naive(prompts, args.new_tokens, torch.float32)
    no_cap = 10**9  # batches of batch_size whatever their length (the CPU default caps padded tokens)
    for label, dtype, batch, cap, prefix in (
            ("kvlib float32, batched, no token cap", "float32", args.batch_size, no_cap, False),
            ("kvlib bfloat16, one at a time", "bfloat16", 1, None, False),
            ("kvlib float32, prefix cache", "float32", 1, None, True),
            ("kvlib default (dtype auto, batch auto)", "auto", args.batch_size, None, False),
            ("kvlib default + prefix cache", "auto", args.batch_size, None, True)):
        backend = HFBackend(models.DEFAULT_MODEL, dtype=dtype, batch_size=batch, max_batch_tokens=cap,
                            prefix_cache=prefix, progress=False)
        results[label + f" [{backend.dtype}, <={backend.max_batch_tokens} tok]"] = time_backend(
            backend, prompts, args.new_tokens)
        del backend
    if not args.no_llama:
        from kvlib.engine.servers import LlamaServer

        with LlamaServer(models.embedded_gguf_path(models.DEFAULT_MODEL), n_ctx=8192) as server:
            backend = OpenAIChatBackend(server.model, base_url=server.base_url, concurrency=1, progress=False)
            backend.generate(["warm up"], 4)
            results["llama.cpp server (Q4_1 GGUF), one at a time"] = time_backend(backend, prompts, args.new_tokens)

    naive_s, naive_answers = results["naive loop, float32"]
    print(f"{'':72s} {'wall s':>8s} {'prompt tok/s':>13s} {'vs naive':>9s} {'same answers':>13s}")
    for label, (seconds, answers) in results.items():
        same = sum(a == b for a, b in zip(answers, naive_answers))
        print(f"{label:72s} {seconds:8.1f} {prompt_tokens / seconds:13.0f} {naive_s / seconds:8.2f}x "
              f"{same:>6d}/{len(prompts)}")
    default = next(v for k, v in results.items() if k.startswith("kvlib default"))
    print(f"kvlib default vs naive loop: {naive_s / default[0]:.2f}x (target >= 2x)")
    with_prefix = next(v for k, v in results.items() if k.startswith("kvlib default + prefix cache"))
    print(f"kvlib default + prefix cache vs naive loop: {naive_s / with_prefix[0]:.2f}x")


if __name__ == "__main__":
    main()
