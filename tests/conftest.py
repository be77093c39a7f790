"""Shared pytest fixtures. Others may append fixtures here."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_checkpoint() -> str:
    """Directory of the embedded model (SmolLM2-135M-Instruct) converted to a plain HF checkpoint.

    Uses the real user cache on purpose: the one-time GGUF conversion takes ~20 s on 2 cores, and after
    it every test session gets the checkpoint for free. (tests/test_models.py checks the conversion itself
    in an isolated cache.)
    """
    from kvlib.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def hf_backend():
    """kvlib.backends.HFBackend on the embedded model in float32 (exact batched == one-at-a-time checks),
    batch_size 3 so a handful of prompts already spans several batches. Loads in ~1-4 s on 2 cores."""
    from kvlib.backends import HFBackend
    from kvlib.models import DEFAULT_MODEL

    return HFBackend(DEFAULT_MODEL, device="cpu", dtype="float32", batch_size=3, progress=False)


@pytest.fixture(scope="session")
def hf_backend_bf16():
    """The embedded model in bfloat16 (what dtype "auto" picks on CPUs with native bf16, and on CUDA)."""
    from kvlib.backends import HFBackend
    from kvlib.models import DEFAULT_MODEL

    return HFBackend(DEFAULT_MODEL, device="cpu", dtype="bfloat16", batch_size=3, progress=False)
