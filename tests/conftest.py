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
