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
    from kvlib.engine.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def hf_backend():
    """kvlib.engine.backends.HFBackend on the embedded model in float32 (exact batched == one-at-a-time checks),
    batch_size 3 so a handful of prompts already spans several batches. Loads in ~1-4 s on 2 cores."""
    from kvlib.engine.backends import HFBackend
    from kvlib.engine.models import DEFAULT_MODEL

    return HFBackend(DEFAULT_MODEL, device="cpu", dtype="float32", batch_size=3, progress=False)


@pytest.fixture(scope="session")
def hf_backend_bf16():
    """The embedded model in bfloat16 (what dtype "auto" picks on CPUs with native bf16, and on CUDA)."""
    from kvlib.engine.backends import HFBackend
    from kvlib.engine.models import DEFAULT_MODEL

    return HFBackend(DEFAULT_MODEL, device="cpu", dtype="bfloat16", batch_size=3, progress=False)


def save_tiny_llama(path, tokenizer, context: int) -> str:
    """A random 2-layer Llama of width 32 with `tokenizer` (its chat template included), saved as a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# Absolute filesystem paths: a top-level folder of some machine, not inside a URL, a longer path or base64 data
# (every character before a path's first slash there is one of [A-Za-z0-9+/=]).
_ABSOLUTE_PATH = None


def find_absolute_paths(text: str, machine: tuple[str, ...] = ()) -> list[str]:
    """The absolute filesystem paths in `text` (a rendered notebook, an HTML page, a manifest): anything under a
    usual top-level folder (/home, /tmp, /work, /usr, ... and C:\\Users), and any of the `machine` prefixes (this
    checkout, its data directory, its Python environment)."""
    import re

    global _ABSOLUTE_PATH
    if _ABSOLUTE_PATH is None:
        roots = ("work|tmp|home|root|usr|opt|var|private|Users|mnt|srv|scratch|data|nfs|gpfs|lustre|media|run|etc|"
                 "snap|cluster|shared|storage|Volumes|net|export|scratch|workspace|content|kaggle|app")
        _ABSOLUTE_PATH = re.compile(r"(?<![A-Za-z0-9+/=_.:~<>$\\-])/(?:" + roots + r")/[^\s\"'<>)\]]*"
                                    r"|\b[A-Za-z]:\\\\?(?:Users|ProgramData|Windows)\b[^\s\"'<>]*")
    found = _ABSOLUTE_PATH.findall(text)
    for prefix in machine:  # as an absolute path, not the tail of a relative one (`../../work/x` from elsewhere)
        if prefix and prefix.rstrip("/") not in ("", "."):
            found += re.findall(r"(?<![\w.~/-])" + re.escape(prefix.rstrip("/")) + r"(?![\w.~-])[^\s\"'<>]*", text)
    return found


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, hf_backend) -> str:
    """A tiny random Llama (2 layers, width 32, context 128) with the embedded model's tokenizer and chat
    template, saved as a checkpoint: loads and generates in milliseconds, for plumbing tests."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hf_backend.tokenizer, 128)


@pytest.fixture(scope="session")
def tiny_llama_4k_dir(tmp_path_factory, hf_backend) -> str:
    """The tiny Llama with a 4096-token context (a profile's prompts fit), in a folder named `tiny-llama`."""
    return save_tiny_llama(tmp_path_factory.mktemp("checkpoints") / "tiny-llama", hf_backend.tokenizer, 4096)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> str:
    """A tiny random MistralForCausalLM (2 layers, width 32, context 4096) with Mistral-7B-Instruct-v0.1's own
    tokenizer (its SentencePiece model, shipped in mistral_common, as an HF tokenizer) and v0.1's chat template
    (no system turn, a space after each `</s>`), in a folder named `tiny-mistral`. Offline, in seconds."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from kvlib.engine.models import hf_tokenizer_from_spm

    path = tmp_path_factory.mktemp("checkpoints") / "tiny-mistral"
    tokenizer = hf_tokenizer_from_spm("mistral-7b-v0.1")
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, sliding_window=None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _meter_points_nowhere():
    """Each test starts and ends with the cost meter keeping no records (kvlib.notebooks.start points it at a
    results folder, which a later test's work must not write into)."""
    from kvlib.engine import meter

    meter.point_at(None)
    yield
    meter.point_at(None)


LEGACY_FIXTURE = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "legacy_cpu"


@pytest.fixture(scope="session")
def legacy_results(tmp_path_factory):
    """A results root holding `cpu/`: the cpu profile's results from before float32 evaluation, raw-text generative
    benchmarks and the learned gate (tests/fixtures/legacy_cpu, see its README), item files unpacked, its
    rejudged.json written as `kvlib rejudge --write` writes it. What the stale-results path (kvlib.pipeline.rejudge,
    the map's stale notes) is tested on, now that the committed results are current."""
    import gzip
    import shutil

    from kvlib.pipeline import rejudge

    root = tmp_path_factory.mktemp("legacy") / "results"
    shutil.copytree(LEGACY_FIXTURE / "cpu", root / "cpu")
    for packed in sorted((root / "cpu").rglob("*.csv.gz")):
        packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
        packed.unlink()
    rejudge.write_record("cpu", root, LEGACY_FIXTURE.parents[2] / "params")
    return root
