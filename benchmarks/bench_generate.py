"""Samples/s of `kvlib.tasks.synthetic` on the paper config (85 dictionaries, <= 4096 tokens) with the embedded
model's fast tokenizer, against a straightforward implementation of the paper's recipe measured in the
same run.

The baseline follows the official script's structure: draw the dictionaries with the gold one first,
deep-copy them into a prompt to check the length (one tokenization), then deep-copy again with the gold
dictionary at its position, render and tokenize a second time, one prompt at a time. kvlib renders
each candidate once and counts tokens in batches (the Rust tokenizer parallelises a batch).

    python benchmarks/bench_generate.py [--n 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import random
import time

from kvlib.tasks import synthetic as gen
from kvlib.engine.models import DEFAULT_MODEL, load_token_counter, load_tokenizer
from readme_section import add_update_option, check, text_block, write


def naive_generate(cfg: gen.GenerationConfig, n: int, tokenizer, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    budget = cfg.max_tokens - cfg.reserve_tokens

    def render_prompt(dicts, key):
        lines = [f"Dictionary [{i + 1}] {d}" for i, d in enumerate(dicts)]
        text = gen.load_template("simple.prompt").format(dictionaries="\n".join(lines), key=key)
        return text + (gen.load_template("simple.template").format(key=key) if cfg.template else "")

    out = []
    for _ in range(n):
        while True:
            dicts, gold = gen._draw_simple(rng, cfg, 0)
            first = copy.deepcopy(dicts)
            if len(tokenizer(render_prompt(first, gold["key"]))["input_ids"]) < budget:
                break
        pos = rng.randrange(cfg.num_dicts)
        moved = copy.deepcopy(dicts[1:])
        moved.insert(pos, copy.deepcopy(dicts[0]))
        prompt = render_prompt(moved, gold["key"])
        if len(tokenizer(prompt)["input_ids"]) >= budget:
            raise RuntimeError("prompt over budget after moving the gold dictionary")
        answer = gen.load_template("simple.answer").format(key=gold["key"], value=gold["value"], name=pos + 1)
        out.append((prompt, answer))
    return out


def best_rate(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="samples per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    add_update_option(parser)
    args = parser.parse_args()
    check(parser, args.update, "bench_generate")

    cfg = gen.GenerationConfig(n_train=args.n, n_eval=0, tokenizer=DEFAULT_MODEL)  # the paper config
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    counter = load_token_counter(DEFAULT_MODEL)
    naive_generate(cfg, 5, tokenizer, 1)  # warm-up both paths
    gen.generate_split(cfg, "train", 5, counter.count)

    naive = best_rate(lambda: naive_generate(cfg, args.n, tokenizer, 0), args.n, args.repeats)
    ours = best_rate(lambda: gen.generate_split(cfg, "train", args.n, counter.count), args.n, args.repeats)
    lines = [f"paper config: {cfg.num_dicts} dictionaries, <= {cfg.max_tokens} tokens, tokenizer {DEFAULT_MODEL}, "
             f"{args.n} samples, best of {args.repeats}",
             f"baseline (official recipe, straightforward): {naive:8.1f} samples/s",
             f"kvlib.tasks.synthetic:                       {ours:8.1f} samples/s",
             f"ratio kvlib / baseline: {ours / naive:.2f}x (target >= 2x)"]
    print("\n".join(lines))
    write(args.update, "bench_generate", text_block(lines))

if __name__ == "__main__":
    main()
