"""The one `--bf16 auto|yes|no` switch of the benchmarks that can time bfloat16 (bench_eval, bench_train): whether
bf16 is timed, and if not, the line saying why. Not a benchmark itself (`make bench` runs bench_*.py only)."""
from __future__ import annotations

import argparse

import torch

from kvlib.engine.backends import cpu_supports_bf16


def add_bf16_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="time bfloat16 too (auto: where it is computed natively, a CUDA GPU or a CPU with bf16 "
                             "instructions; emulated bf16 is many times slower than float32, so it is skipped)")


def bf16_timed(choice: str) -> tuple[bool, str | None]:
    """(time bf16?, why not, as the line the results print when it is not timed)."""
    native = torch.cuda.is_available() or cpu_supports_bf16()
    if choice == "yes" or (choice == "auto" and native):
        return True, None
    why = "--bf16 no" if choice == "no" else "this CPU has no native bf16: it is emulated, many times slower"
    return False, f"bf16 not timed ({why}; --bf16 yes times it anyway)"
