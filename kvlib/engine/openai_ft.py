"""Finetune an OpenAI chat model (the paper's gpt-3.5-turbo-1106) on a kvlib chat JSONL via the fine-tuning API.

Flow (`kvlib openai-finetune --params P [--dry-run]`):
1. validate every line of the OpenAI-format file(s) (`<split>.openai.jsonl` from `kvlib generate`) and count
   tokens the way OpenAI's cookbook does, so a bad file fails here, for free, not after an upload;
2. print the examples/tokens/billed-tokens/USD estimate (a dry run stops here: offline, no API key);
3. upload, create the job, poll it to the end and record the fine-tuned model name.

Resumability: everything about the job lives in `<job_dir>/openai_job.json`, written atomically after each
step (file ids right after upload, the job id right after creation, before any polling). Re-running the same
command resumes polling that job and never creates a second one; a job whose creation response was lost is
found again by the `kvlib_run_id` metadata we attach to it. The API key is read by the SDK from
OPENAI_API_KEY and never stored, printed or logged by kvlib.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from tqdm.auto import tqdm

from kvlib.engine.config import check_positive, fail, from_mapping, load_yaml, params_section
from kvlib.engine.io import atomic_write_text, dumps_json, file_sha256
from kvlib.engine.models import load_token_counter

STATE_FILE = "openai_job.json"
EVENTS_FILE = "openai_events.jsonl"
API_KEY_ENV = "OPENAI_API_KEY"
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")  # kvlib's files never use `name`/`weight`; anything else is a mistake
# OpenAI cookbook token count for chat models ("How to count tokens with tiktoken", gpt-3.5-turbo-0613 and
# later): every message costs 3 tokens of formatting (<|start|>{role}\n ... <|end|>\n) on top of its role and
# content tokens, and every conversation 3 more for priming the reply (<|start|>assistant<|message|>).
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3
MIN_TRAIN_EXAMPLES = 10  # the fine-tuning API rejects training files with fewer examples
MAX_SUFFIX_CHARS = 64  # `suffix`: "a string of up to 64 characters" (openai SDK, fine_tuning.jobs.create)
MAX_SEED = 2**31 - 1  # the API's seed is a 32-bit signed integer
MAX_REPORTED_ERRORS = 20  # a broken generator breaks every line: show the first few, count the rest
COUNT_CHUNK = 256  # examples tokenized per batch: bounded memory for large files, batched tiktoken calls
MAX_POLL_FAILURES = 10  # consecutive transient polling errors (after the SDK's own retries) before giving up
MAX_POLL_BACKOFF_S = 600.0

Counter = Callable[[list[str]], list[int]]


class OpenAIFinetuneError(RuntimeError):
    """The fine-tuning run cannot go on (no API key, changed data, failed job, ...). The message says why."""


class ChatFileError(ValueError):
    """A chat JSONL file has malformed lines. The message lists `file:line: problem` entries."""


# ----------------------------------------------------------------------------------------------- params


@dataclass
class OpenAIFinetuneConfig:
    """One OpenAI fine-tuning run. Params YAML: these keys at the top level or under `openai_finetune:`."""

    train_file: Path  # OpenAI-format chat JSONL, e.g. runs/data/<dataset>/train.openai.jsonl
    job_dir: Path  # where openai_job.json (the resumable job state) and the event log are kept
    validation_file: Path | None = None
    model: str = "gpt-3.5-turbo-1106"
    # The paper states 3 epochs in §3.1 and 2 in App. A.1; kvlib defaults to the main text's 3.
    n_epochs: int = 3
    batch_size: int | None = None  # None: "auto" (the API picks)
    learning_rate_multiplier: float | None = None  # None: "auto"
    suffix: str | None = None  # added to the fine-tuned model's name
    seed: int = 0
    tokenizer: str | None = None  # token counting; None: "tiktoken:<model>"
    base_url: str | None = None  # an OpenAI-compatible server; None: the SDK default (or $OPENAI_BASE_URL)
    # gpt-3.5-turbo-1106 has a 16,385-token context window, and OpenAI limits each fine-tuning example to the
    # model's context (the fine-tuning guide; the cookbook's data-prep notebook uses 16,385 since
    # openai/openai-cookbook#1178). Older snapshots differ (gpt-3.5-turbo-0613: 4,096), hence a param.
    context_limit: int = 16385
    # Published gpt-3.5-turbo fine-tuning price: $0.008 per 1K training tokens (billed tokens = file tokens x
    # epochs; validation tokens are not billed). A param because prices change.
    price_per_1k_training_tokens: float = 0.008
    poll_interval_s: float = 30.0
    timeout_s: float = 600.0  # per HTTP request (the SDK's own default is 600 s)
    max_retries: int = 5  # SDK retries of 408/409/429/5xx/connection errors, exponential backoff

    def validate(self) -> None:
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.suffix != ".jsonl":
                fail(name, f"the fine-tuning API only accepts .jsonl files, got {str(path)!r}")
        if not self.model:
            fail("model", "must name a model, e.g. gpt-3.5-turbo-1106")
        check_positive("n_epochs", self.n_epochs)
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size)
        if self.learning_rate_multiplier is not None and self.learning_rate_multiplier <= 0:
            fail("learning_rate_multiplier", f"must be > 0, got {self.learning_rate_multiplier}")
        if self.suffix is not None and not 1 <= len(self.suffix) <= MAX_SUFFIX_CHARS:
            fail("suffix", f"must have 1 to {MAX_SUFFIX_CHARS} characters, got {len(self.suffix)}")
        if not 0 <= self.seed <= MAX_SEED:
            fail("seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        if self.tokenizer is not None and not self.tokenizer:
            fail("tokenizer", "must name a tokenizer (or be omitted)")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            fail("base_url", f"must be an http(s) URL, got {self.base_url!r}")
        check_positive("context_limit", self.context_limit)
        check_positive("price_per_1k_training_tokens", self.price_per_1k_training_tokens, 0)
        for name in ("poll_interval_s", "timeout_s"):
            if getattr(self, name) <= 0:
                fail(name, f"must be > 0 seconds, got {getattr(self, name)}")
        check_positive("max_retries", self.max_retries, 0)

    @property
    def token_counter_spec(self) -> str:
        return self.tokenizer or f"tiktoken:{self.model}"

    def hyperparameters(self) -> dict:
        """The job's supervised hyperparameters as the API takes them (unset ones are "auto")."""
        return {
            "n_epochs": self.n_epochs,
            "batch_size": "auto" if self.batch_size is None else self.batch_size,
            "learning_rate_multiplier": (
                "auto" if self.learning_rate_multiplier is None else self.learning_rate_multiplier
            ),
        }


def load_config(params: str | Path | Mapping[str, Any]) -> OpenAIFinetuneConfig:
    """Config from a params YAML (or a mapping): top-level keys, or the `openai_finetune:` section."""
    data = dict(params) if isinstance(params, Mapping) else load_yaml(params)
    return from_mapping(OpenAIFinetuneConfig, *params_section(data, "openai_finetune"))


# ------------------------------------------------------------------------------------ file validation


def _count_fn(counter: Any) -> Counter:
    """Accept kvlib's TokenCounter (has .count) or a plain `list[str] -> list[int]` callable."""
    return counter.count if hasattr(counter, "count") else counter


def _example_problem(line: str) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a well-formed example line, else (None, what is wrong with it)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    if set(row) != {"messages"}:
        return None, f"expected exactly one key 'messages', got {sorted(row)}"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return None, "'messages' must be a non-empty list"
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            return None, f"{where}: expected an object, got {type(msg).__name__}"
        extra = sorted(set(msg) - set(MESSAGE_KEYS))
        if extra or "role" not in msg:
            return None, f"{where}: keys must be {list(MESSAGE_KEYS)}, got {sorted(msg)}"
        if msg["role"] not in ROLES:
            return None, f"{where}: role must be one of {list(ROLES)}, got {msg['role']!r}"
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            return None, f"{where}: content must be a non-empty string, got {content!r}"
        if msg["role"] == "system" and i != 0:
            return None, f"{where}: a system message is only allowed first"
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return None, "no assistant message (the training target)"
    if roles[-1] != "assistant":
        return None, f"the last message must be the assistant's (the training target), got {roles[-1]!r}"
    return messages, None


def _chat_token_counts(batch: list[list[dict]], count: Counter) -> list[int]:
    """Cookbook token count of each conversation: per message role + content + TOKENS_PER_MESSAGE, plus
    TOKENS_REPLY_PRIMING. One tokenizer call for the whole batch."""
    texts = [text for messages in batch for m in messages for text in (m["role"], m["content"])]
    counts = iter(count(texts))
    return [
        sum(next(counts) + next(counts) + TOKENS_PER_MESSAGE for _ in messages) + TOKENS_REPLY_PRIMING
        for messages in batch
    ]


def _raise_if_errors(path: Path, errors: list[str], n_errors: int) -> None:
    if not n_errors:
        return
    more = f"\n  ... and {n_errors - len(errors)} more" if n_errors > len(errors) else ""
    raise ChatFileError(f"{path}: {n_errors} problem(s) in the chat file:\n  " + "\n  ".join(errors) + more)


def validate_chat_file(path: str | Path, counter: Any, context_limit: int, min_examples: int = 1) -> dict:
    """Check every line of an OpenAI-format chat JSONL and count its tokens.

    Each line must be one JSON object {"messages": [...]} with roles in system/user/assistant, non-empty
    string contents, a system message (if any) only first and an assistant message last; each example must
    fit `context_limit` tokens (cookbook count, see TOKENS_PER_MESSAGE). All problems are collected (the
    first MAX_REPORTED_ERRORS shown, as `file:line: problem`) and raised as one ChatFileError (a ValueError).
    `counter` is a kvlib TokenCounter or a `list[str] -> list[int]` callable.
    Returns {"n_examples", "total_tokens", "min_tokens", "max_tokens", "mean_tokens"}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: chat file not found")
    count = _count_fn(counter)
    errors: list[str] = []
    n_errors = 0
    lengths: list[int] = []
    pending: list[tuple[int, list[dict]]] = []

    def report(lineno: int, problem: str) -> None:
        nonlocal n_errors
        n_errors += 1
        if len(errors) < MAX_REPORTED_ERRORS:
            errors.append(f"{path}:{lineno}: {problem}")

    def flush() -> None:
        for (lineno, _), n in zip(pending, _chat_token_counts([m for _, m in pending], count)):
            lengths.append(n)
            if n > context_limit:
                report(lineno, f"{n} tokens, more than context_limit={context_limit}")
        pending.clear()

    with path.open("rb") as fh:  # bytes, so one undecodable line is reported like any other bad line
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report(lineno, f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                report(lineno, "empty line (every line must be one example)")
                continue
            messages, problem = _example_problem(line)
            if problem is not None:
                report(lineno, problem)
                continue
            pending.append((lineno, messages))
            if len(pending) >= COUNT_CHUNK:
                flush()
    flush()
    if n_errors == 0 and len(lengths) < min_examples:
        report(len(lengths), f"{len(lengths)} example(s); at least {min_examples} are required")
    _raise_if_errors(path, errors, n_errors)
    return {
        "n_examples": len(lengths),
        "total_tokens": sum(lengths),
        "min_tokens": min(lengths, default=0),
        "max_tokens": max(lengths, default=0),
        "mean_tokens": round(statistics.fmean(lengths), 1) if lengths else 0.0,
    }


def validate_files(cfg: OpenAIFinetuneConfig) -> dict[str, dict]:
    """Stats of the training file (and the validation file, if any); raises on any problem."""

    check_files_exist(cfg)
    counter = load_token_counter(cfg.token_counter_spec)
    stats = {"train": validate_chat_file(cfg.train_file, counter, cfg.context_limit, MIN_TRAIN_EXAMPLES)}
    if cfg.validation_file is not None:
        stats["validation"] = validate_chat_file(cfg.validation_file, counter, cfg.context_limit)
    return stats


def check_files_exist(cfg: OpenAIFinetuneConfig) -> None:
    for name in ("train_file", "validation_file"):
        path = getattr(cfg, name)
        if path is not None and not path.is_file():
            fail(name, f"file not found: {path}")


# ------------------------------------------------------------------------------------------------ cost


def estimate_cost(stats: Mapping[str, Any], n_epochs: int, price_per_1k: float) -> float:
    """Estimated USD of training: every token of the training file is billed once per epoch."""
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
    if price_per_1k < 0:
        raise ValueError(f"price_per_1k must be >= 0, got {price_per_1k}")
    return stats["total_tokens"] * n_epochs / 1000 * price_per_1k


def format_summary(cfg: OpenAIFinetuneConfig, stats: Mapping[str, Mapping[str, Any]]) -> str:
    """Human-readable data + cost summary printed before anything is uploaded."""
    train = stats["train"]
    billed = train["total_tokens"] * cfg.n_epochs
    cost = estimate_cost(train, cfg.n_epochs, cfg.price_per_1k_training_tokens)
    lines = [
        f"model: {cfg.model}   tokens counted with {cfg.token_counter_spec} (+{TOKENS_PER_MESSAGE}/message, "
        f"+{TOKENS_REPLY_PRIMING}/example)",
        f"train file: {cfg.train_file}",
        f"  examples: {train['n_examples']:,}   tokens: {train['total_tokens']:,}   per example: "
        f"min {train['min_tokens']:,} / mean {train['mean_tokens']:,} / max {train['max_tokens']:,} "
        f"(limit {cfg.context_limit:,})",
    ]
    if "validation" in stats:
        val = stats["validation"]
        lines.append(f"validation file: {cfg.validation_file}")
        lines.append(f"  examples: {val['n_examples']:,}   tokens: {val['total_tokens']:,} (not billed)")
    lines.append(f"epochs: {cfg.n_epochs}   billed tokens: {billed:,}   estimated cost: ${cost:,.2f} "
                 f"(at ${cfg.price_per_1k_training_tokens} per 1K training tokens)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ job state


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def state_path(job_dir: str | Path) -> Path:
    return Path(job_dir) / STATE_FILE


def load_state(job_dir: str | Path) -> dict | None:
    """The recorded job state, or None when this job_dir has none yet."""
    path = state_path(job_dir)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise OpenAIFinetuneError(f"{path}: corrupt job state ({exc.msg}); it is written atomically, so this "
                                  f"was edited by hand: fix it or move it away") from None
    if not isinstance(state, dict):
        raise OpenAIFinetuneError(f"{path}: job state must be a JSON object")
    return state


def _save_state(job_dir: Path, state: dict) -> None:
    # Atomic (temp file + rename): a crash never leaves a half-written state that would lose the job id.
    state["updated_at"] = _now()
    atomic_write_text(state_path(job_dir), dumps_json(state))


def _request(cfg: OpenAIFinetuneConfig) -> dict:
    """What defines the job: recorded in the state and compared when resuming."""
    val = cfg.validation_file
    return {
        "model": cfg.model,
        "hyperparameters": cfg.hyperparameters(),
        "suffix": cfg.suffix,
        "seed": cfg.seed,
        "train_file": str(cfg.train_file),
        "train_sha256": file_sha256(cfg.train_file),
        "validation_file": None if val is None else str(val),
        "validation_sha256": None if val is None else file_sha256(val),
    }


# Fields that must match for a recorded job to be resumed; the file *paths* may move, the contents may not.
_MUST_MATCH = ("train_sha256", "validation_sha256", "model", "hyperparameters", "suffix", "seed")


def _check_resumable(state: dict, request: dict, job_dir: Path) -> None:
    """Refuse to reuse a job (or uploads) made from other data or settings than the current config."""
    where = f"job {state['job_id']}" if state.get("job_id") else "the uploads"
    if state.get("train_sha256") != request["train_sha256"]:
        raise OpenAIFinetuneError(
            f"{state_path(job_dir)}: the training file changed since {where} was made from it "
            f"(sha256 {state.get('train_sha256')} recorded, {request['train_sha256']} now for "
            f"{request['train_file']}); "
            f"use a new job_dir for new data, or restore the original file")
    changed = [k for k in _MUST_MATCH if state.get(k) != request[k]]
    if changed:
        diffs = ", ".join(f"{k}: {state.get(k)!r} recorded, {request[k]!r} now" for k in changed)
        raise OpenAIFinetuneError(f"{state_path(job_dir)}: the config differs from {where} ({diffs}); "
                                  f"use a new job_dir for a new job")


def _record_job(state: dict, job: Any) -> None:
    """Copy what we keep of a FineTuningJob object into the state."""
    state["job_id"] = job.id
    state["status"] = job.status
    state["fine_tuned_model"] = job.fine_tuned_model
    state["trained_tokens"] = job.trained_tokens
    state["job_created_at"] = job.created_at
    state["job_finished_at"] = job.finished_at
    # The API sends `error: {}` or null while a job is fine; the SDK builds a partial object from `{}`.
    error = getattr(job, "error", None)
    message = getattr(error, "message", None)
    state["error"] = {"code": getattr(error, "code", None), "message": message} if message else None


# ----------------------------------------------------------------------------------------------- client


def require_api_key() -> None:
    """Fail clearly when OPENAI_API_KEY is unset. The value itself is left to the SDK and never touched."""
    if not os.environ.get(API_KEY_ENV, "").strip():
        raise OpenAIFinetuneError(
            f"{API_KEY_ENV} is not set: export your OpenAI API key in the environment (kvlib reads it only "
            f"from there and never writes it anywhere); `--dry-run` works without one")


def make_client(cfg: OpenAIFinetuneConfig) -> Any:
    """An openai.OpenAI client. The SDK itself retries 408/409/429/5xx responses, timeouts and connection
    errors up to `max_retries` times with exponential backoff (0.5 s doubling to 8 s, jittered, or the
    server's Retry-After), reusing one idempotency key for a retried POST."""
    import openai

    require_api_key()
    return openai.OpenAI(base_url=cfg.base_url, max_retries=cfg.max_retries, timeout=cfg.timeout_s)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth waiting out while polling (the SDK's own retries already gave up on them)."""
    import openai

    return (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError, openai.ConflictError)


# ------------------------------------------------------------------------------------------- the run

_sleep = time.sleep  # module-level so tests can interrupt a run between polls


def _upload(client: Any, path: Path) -> str:
    with path.open("rb") as fh:  # a seekable handle: the SDK rewinds it when it retries the upload
        return client.files.create(file=fh, purpose="fine-tune").id


def _find_created_job(client: Any, state: dict) -> Any | None:
    """A job created by an earlier run whose response never reached us (crash, lost connection), found by
    the run id we attach as metadata. Checked against the training file id so a server that ignores the
    metadata filter cannot hand us someone else's job."""
    import openai

    try:
        jobs = list(client.fine_tuning.jobs.list(metadata={"kvlib_run_id": state["run_id"]}, limit=100))
    except openai.NotFoundError:  # a compatible server without the list endpoint: nothing to find
        return None
    for job in jobs:
        metadata = getattr(job, "metadata", None) or {}
        if metadata.get("kvlib_run_id") == state["run_id"] and job.training_file == state["training_file_id"]:
            return job
    return None


def _create_job(client: Any, cfg: OpenAIFinetuneConfig, state: dict) -> Any:
    kwargs: dict[str, Any] = {
        "model": cfg.model,
        "training_file": state["training_file_id"],
        # `method` is the current form of the hyperparameters (the top-level `hyperparameters` argument is
        # deprecated in favour of it, per the openai SDK); same n_epochs/batch_size/learning_rate_multiplier.
        "method": {"type": "supervised", "supervised": {"hyperparameters": cfg.hyperparameters()}},
        "seed": cfg.seed,
        "metadata": {"kvlib_run_id": state["run_id"]},
    }
    if state.get("validation_file_id"):
        kwargs["validation_file"] = state["validation_file_id"]
    if cfg.suffix is not None:
        kwargs["suffix"] = cfg.suffix
    return client.fine_tuning.jobs.create(**kwargs)


def _start_job(client: Any, cfg: OpenAIFinetuneConfig, state: dict, job_dir: Path) -> None:
    """Upload the file(s) and create the job, saving the state after every step that costs money or
    creates something remote, so that a rerun continues instead of repeating it."""
    if state.get("create_attempted_at"):
        job = _find_created_job(client, state)
        if job is not None:
            _record_job(state, job)
            _save_state(job_dir, state)
            return
    uploads = (("training_file_id", cfg.train_file), ("validation_file_id", cfg.validation_file))
    for key, path in uploads:
        if path is not None and not state.get(key):
            state[key] = _upload(client, path)
            _save_state(job_dir, state)
    state["create_attempted_at"] = _now()
    _save_state(job_dir, state)
    job = _create_job(client, cfg, state)
    _record_job(state, job)
    _save_state(job_dir, state)  # the job id is on disk before the first poll


def _new_events(client: Any, job_id: str, seen: set[str]) -> list[dict]:
    """Events not seen yet, oldest first. The API lists newest first and pages backwards in time, so read
    until the first known event."""
    fresh = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
        if event.id in seen:
            break
        fresh.append({"id": event.id, "created_at": event.created_at, "level": event.level,
                      "message": event.message, "type": getattr(event, "type", None),
                      "data": getattr(event, "data", None)})
    fresh.reverse()
    return fresh


def _seen_event_ids(job_dir: Path) -> set[str]:
    path = job_dir / EVENTS_FILE
    if not path.is_file():
        return set()
    seen = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            seen.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash: its event is simply fetched again
    return seen


def _append_events(job_dir: Path, events: list[dict]) -> None:
    if events:
        with (job_dir / EVENTS_FILE).open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e, sort_keys=True, default=str) + "\n" for e in events)


def _show(bar: Any, job: Any, events: list[dict]) -> None:
    """Progress bar: steps from the latest metrics event (when the job reports them), status, last message."""
    for event in events:
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if "step" in data and "total_steps" in data:
            bar.total = data["total_steps"]
            bar.n = data["step"]
        elif event["type"] != "metrics" and not bar.disable:
            bar.write(f"[{job.id}] {event['level']}: {event['message']}", file=sys.stderr)
    bar.set_postfix_str(job.status, refresh=False)
    bar.refresh()


def _poll(client: Any, cfg: OpenAIFinetuneConfig, state: dict, job_dir: Path, progress: bool) -> Any:
    """Poll the job until it ends, recording status and events. Transient errors that outlast the SDK's
    retries (a long outage) are waited out with our own exponential backoff; after MAX_POLL_FAILURES in a
    row we stop, and a rerun resumes polling the same job."""

    transient = _transient_errors()
    seen = _seen_event_ids(job_dir)
    failures = 0
    with tqdm(desc=f"openai {state['job_id']}", unit="step", disable=not progress, file=sys.stderr) as bar:
        while True:
            try:
                job = client.fine_tuning.jobs.retrieve(state["job_id"])
                events = _new_events(client, job.id, seen)
            except transient as exc:
                failures += 1
                if failures > MAX_POLL_FAILURES:
                    raise OpenAIFinetuneError(
                        f"polling job {state['job_id']} failed {failures} times in a row ({type(exc).__name__}: "
                        f"{exc}); the job keeps running at OpenAI: rerun the same command to resume") from exc
                delay = min(cfg.poll_interval_s * 2**failures, MAX_POLL_BACKOFF_S)
                bar.write(f"[{state['job_id']}] {type(exc).__name__} while polling; retrying in {delay:.3g} s",
                          file=sys.stderr)
                _sleep(delay)
                continue
            failures = 0
            _append_events(job_dir, events)
            seen.update(e["id"] for e in events)
            _record_job(state, job)
            _save_state(job_dir, state)
            _show(bar, job, events)
            if job.status in TERMINAL_STATUSES:
                return job
            _sleep(cfg.poll_interval_s)


def run_finetune(cfg: OpenAIFinetuneConfig, client: Any = None, progress: bool = True) -> dict:
    """Create (or resume) the fine-tuning job of `cfg` and poll it to the end; returns the job state.

    A `<job_dir>/openai_job.json` with a job id means "resume polling that job": no second job is created.
    Raises OpenAIFinetuneError when OPENAI_API_KEY is missing (and no `client` is given), when the training
    file or job settings differ from the recorded job's, or when the job fails or is cancelled.
    """
    if client is None:
        require_api_key()  # before any work, so a missing key costs nothing
    job_dir = Path(cfg.job_dir)
    check_files_exist(cfg)
    request = _request(cfg)
    state = load_state(job_dir)
    if state is not None:
        _check_resumable(state, request, job_dir)
    if client is None:
        client = make_client(cfg)
    if state is None or not state.get("job_id"):
        if state is None:
            validate_files(cfg)  # never upload a file the API would reject after the upload
            state = {"run_id": uuid.uuid4().hex, "created_at": _now(), **request}
        _start_job(client, cfg, state, job_dir)
    job = _poll(client, cfg, state, job_dir, progress)
    if job.status != "succeeded":
        reason = state["error"]["message"] if state.get("error") else "no error message given"
        raise OpenAIFinetuneError(f"fine-tuning job {job.id} {job.status}: {reason} (state in "
                                  f"{state_path(job_dir)}; use a new job_dir to start over)")
    return state


def main_cli(params: Path, dry_run: bool) -> int:
    """`kvlib openai-finetune`: validate, print the cost estimate, then (unless dry_run) run the job."""
    cfg = load_config(params)
    try:
        stats = validate_files(cfg)
        print(format_summary(cfg, stats))
        if dry_run:
            print("dry run: nothing uploaded")
            return 0
        state = run_finetune(cfg)
    except (ChatFileError, OpenAIFinetuneError) as exc:
        print(f"kvlib openai-finetune: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an API error the SDK gave up on: a clear line instead of a traceback
        import openai

        if not isinstance(exc, openai.OpenAIError):
            raise
        print(f"kvlib openai-finetune: OpenAI API error ({type(exc).__name__}): {exc}; "
              f"rerun to resume from {state_path(cfg.job_dir)}", file=sys.stderr)
        return 1
    print(f"fine-tuned model: {state['fine_tuned_model']}")
    return 0


__all__ = [
    "ChatFileError",
    "OpenAIFinetuneConfig",
    "OpenAIFinetuneError",
    "estimate_cost",
    "format_summary",
    "load_config",
    "load_state",
    "main_cli",
    "make_client",
    "run_finetune",
    "state_path",
    "validate_chat_file",
    "validate_files",
]
