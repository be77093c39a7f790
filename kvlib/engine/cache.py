"""The on-disk response cache: every model response, stored the moment it arrives, keyed by what produced it.

A key is the sha256 of (backend identity, request kind, exact request, generation params). The exact request
is its JSON form (kvlib.engine.backends.request_payload): chat messages, or ``{"raw_text": ...}`` for a RawPrompt
(text without the chat template), so the same text asked raw and as a chat message are two entries. The identity is
the backend's `identity()`: for a local model it includes the weights' sha256, dtype and chat template, for
an API model the base URL and model name (a fine-tuned model's name is unique). The generation params are
`max_new_tokens` and, when the request carries one, its stop rule (kvlib.engine.backends.StopRule): an answer cut
where a task's scorer stops reading is stored apart from a whole reply and never stands for one. The other
way is sound, and used: a whole reply of the same request and budget, cut by the rule, is exactly the
stopped answer (StopRule's contract), so a cache of whole replies still answers stopped requests. So a changed
model, prompt, budget or stop rule can never be answered from a stale entry, and an interrupted evaluation,
run again, asks the model only for what is missing: nothing is lost (each response is committed as it
arrives) and nothing is counted twice (one row per key).

SQLite (standard library) holds it: a commit is atomic, so a process killed mid-write leaves the previous
state, and a half-written record cannot exist.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from kvlib.engine import meter
from kvlib.engine.backends import (ContextLengthError, StopRule, check_max_new_tokens, generate_until, request_payload,
                                   to_messages)
from kvlib.engine.config import InputError
from kvlib.engine.io import sha256_text

CACHE_FILE = "responses.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
)
"""


_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT ("database disk image is malformed"), SQLITE_NOTADB



class CorruptCacheError(InputError):
    """The response cache file is damaged (a disk fault, a copy cut short): named with its path and the command
    that moves it aside, after which the answers it held are asked again (nothing else is lost)."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        aside = self.path.with_name(self.path.name + ".corrupt")
        super().__init__(f"{self.path}: the response cache is corrupt ({reason}); move it aside with "
                         f"`mv {self.path} {aside}` (its -wal and -shm files too, when present) and run again: only "
                         f"the answers it held are asked again")


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, sqlite3.OperationalError):  # "database is locked", a full disk: not a damaged file
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code in _CORRUPT_CODES or any(m in str(exc) for m in ("malformed", "not a database"))


@contextlib.contextmanager
def _named_if_corrupt(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            raise CorruptCacheError(path, str(exc)) from None
        raise


def check_cache(directory: str | Path) -> None:
    """Raise CorruptCacheError when the response cache in `directory` exists and is damaged (SQLite's
    quick_check: every page read once; no-op when there is no cache yet). `kvlib reproduce` calls it before any
    compute, so a damaged cache is reported up front instead of failing a notebook an hour in."""
    path = Path(directory) / CACHE_FILE
    if not path.is_file():
        return
    with _named_if_corrupt(path):
        db = sqlite3.connect(path, timeout=60)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    if rows != [("ok",)]:
        raise CorruptCacheError(path, "; ".join(str(r[0]) for r in rows[:3]))


def generation_params(max_new_tokens: int, stop: Any = None) -> dict:
    """The generation params of a generate() key: the budget, greedy decoding, and the stop rule if any (left
    out when there is none, so that keys written before stop rules existed stay valid)."""
    params = {"max_new_tokens": max_new_tokens, "decoding": "greedy"}
    if stop is not None:
        params["stop"] = stop.key()
    return params


def cache_key(identity: dict, kind: str, request: Any, params: dict) -> str:
    """sha256 of the canonical JSON of everything that determines a response."""
    payload = {"identity": identity, "kind": kind, "request": request, "params": params}
    return sha256_text(json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")))


class ResponseCache:
    """Responses by key in `<directory>/responses.sqlite` (created on first use)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit off by default in sqlite3: put() commits each response itself
        with _named_if_corrupt(self.path):
            self._db = sqlite3.connect(self.path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer (several notebooks)
            self._db.execute(_SCHEMA)
            self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The stored responses among `keys` (decoded), by key."""
        found: dict[str, Any] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite's limit on bound parameters
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            with _named_if_corrupt(self.path):
                for key, response in self._db.execute(
                        f"SELECT key, response FROM responses WHERE key IN ({marks})", chunk):
                    found[key] = json.loads(response)
        return found

    def put(self, key: str, kind: str, backend: str, request: Any, response: Any) -> None:
        """Store one response and commit at once (an interruption loses at most the one in flight)."""
        with _named_if_corrupt(self.path):
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, kind, backend, request, response, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, kind, backend, json.dumps(request, ensure_ascii=False), json.dumps(response), time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with _named_if_corrupt(self.path):
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class CachedBackend:
    """A backend whose generate() and loglikelihood() answers come from a ResponseCache when present and are
    stored there as the wrapped backend produces them. Everything else (identity, fits, context_length, ...)
    is the wrapped backend's."""

    def __init__(self, backend: Any, cache: ResponseCache):
        self.backend, self.cache = backend, cache
        self.name = backend.name
        self._identity = backend.identity()  # computed once: a local model's identity hashes its weights
        self.hits = self.misses = 0

    def identity(self) -> dict:
        return self._identity

    def __getattr__(self, attr: str) -> Any:
        # only reached for attributes CachedBackend does not define itself
        return getattr(self.backend, attr)

    def generate(self, requests: Sequence[Any], max_new_tokens: int, on_result: Callable | None = None,
                 stop: Any = None) -> list:

        check_max_new_tokens(max_new_tokens)
        if stop is not None and not isinstance(stop, StopRule):
            raise TypeError(f"stop must be a kvlib.engine.backends.StopRule or None, got {stop!r}")
        payloads = [request_payload(r, f"requests[{i}]") for i, r in enumerate(requests)]
        params = generation_params(max_new_tokens, stop)
        # a stopped request is also answered by the whole reply of the same request and budget, cut by the rule
        whole = None if stop is None else (generation_params(max_new_tokens, None), stop.apply)
        return self._answer("generate", payloads, params, on_result,
                            lambda todo, store: generate_until(self.backend, todo, max_new_tokens, stop, store),
                            whole, requests=list(requests))

    def loglikelihood(self, requests: Sequence[Any], on_result: Callable | None = None) -> list:

        if not hasattr(self.backend, "loglikelihood"):
            raise NotImplementedError(f"the {self.name} backend has no log-likelihood scoring")
        payloads = []
        for i, request in enumerate(requests):
            if not isinstance(request, (tuple, list)) or len(request) != 2:
                raise TypeError(f"requests[{i}]: expected a (context, continuation) pair, got {request!r}")
            context, continuation = request
            context = context if isinstance(context, str) else to_messages(context, f"requests[{i}][0]")
            payloads.append([context, continuation])
        return self._answer("loglikelihood", payloads, {}, on_result,
                            lambda todo, store: self.backend.loglikelihood([tuple(p) for p in todo],
                                                                          on_result=store))

    def _answer(self, kind: str, payloads: list, params: dict, on_result: Callable | None,
                run: Callable[[list, Callable], list],
                fallback: tuple[dict, Callable[[Any], Any]] | None = None, requests: list | None = None) -> list:
        """Cached responses, the rest from `run`; `fallback` = (other params, how their response becomes this
        one): responses stored under those params answer what these keys lack. `payloads`: the JSON form keyed and
        stored; `requests`: what the backend is asked (default: the payloads)."""

        keys = [cache_key(self._identity, kind, p, params) for p in payloads]
        found = self.cache.get_many(keys)
        if fallback is not None and len(found) < len(set(keys)):
            other_params, convert = fallback
            missing = {k: cache_key(self._identity, kind, p, other_params) for k, p in zip(keys, payloads)
                       if k not in found}
            other = self.cache.get_many(list(missing.values()))
            found.update({k: convert(other[o]) for k, o in missing.items() if o in other})
        results: list = [None] * len(payloads)
        todo_index: dict[str, list[int]] = {}  # identical requests are asked once
        for i, key in enumerate(keys):
            if key in found:
                results[i] = _decode(kind, found[key])
                if on_result:
                    on_result(i, results[i])
            else:
                todo_index.setdefault(key, []).append(i)
        hits = len(payloads) - sum(len(v) for v in todo_index.values())
        self.hits += hits
        if getattr(self.backend, "meter_tags", None) is not None:  # counted, at no cost, where a backend is metered
            meter.cached(kind, self.backend.meter_tags, hits)
        if not todo_index:
            return results
        todo_keys = list(todo_index)
        todo = [payloads[todo_index[k][0]] for k in todo_keys]
        asked = todo if requests is None else [requests[todo_index[k][0]] for k in todo_keys]

        def store(j: int, response: Any) -> None:
            self.cache.put(todo_keys[j], kind, self.name, todo[j], response)
            for i in todo_index[todo_keys[j]]:
                results[i] = response
                if on_result:
                    on_result(i, response)

        self.misses += len(todo)
        try:
            run(asked, store)
        except ContextLengthError as exc:  # report the caller's indices, with every answer that did come back
            over = [i for j in exc.indices for i in todo_index[todo_keys[j]]]
            lengths = [n for j, n in zip(exc.indices, exc.lengths) for _ in todo_index[todo_keys[j]]]
            raise ContextLengthError(over, lengths, exc.limit, exc.what, results=results) from None
        return results


def _decode(kind: str, response: Any) -> Any:
    # JSON has no tuples: a log-likelihood result goes back to (logprob, is_greedy)
    return tuple(response) if kind == "loglikelihood" else response


def cache_stats(backends: Iterable[Any]) -> list[dict]:
    """Hits and misses of CachedBackends, for a notebook to show what was reused."""
    return [{"backend": b.name, "hits": b.hits, "misses": b.misses} for b in backends if isinstance(b, CachedBackend)]
