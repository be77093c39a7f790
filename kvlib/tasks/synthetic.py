"""Synthetic numerical key-value retrieval data (paper §2, Figs. 1-3).

Two tasks, each with and without the answer template:
- ``simple``: every key is one integer; "Report the value of key K and the dictionary it is in."
- ``multisubkey``: every key is a tuple of integer subkeys; distractor keys share some subkeys
  with the gold key; the question lists the gold key's subkeys in shuffled order.

Prompt, template and answer texts live in ``kvlib/tasks/templates/*.txt``.

Determinism: sample ``i`` of split ``s`` draws every random number from its own
``random.Random(f"kvlib/{seed}/{s}/{i}")`` stream, so output is byte-identical for a seed and does
not depend on batch sizes. Speed: a candidate is rendered once and tokenized once (in batches,
which the Rust tokenizers parallelise); a too-long candidate is redrawn from the same stream.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import statistics
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from tqdm.auto import tqdm

from kvlib.engine.config import (
    InputError,
    ParamError,
    check_fraction,
    check_positive,
    check_range,
    fail,
    from_mapping,
    load_yaml,
    params_section,
    to_mapping,
)
from kvlib.engine.backends import StopRule, generate_until
from kvlib.engine.data import read_jsonl
from kvlib.engine.evaluate import answer_requests, result_fields
from kvlib.engine.models import load_token_counter
from kvlib.engine.scoring import score_kv_answer

Task = Literal["simple", "multisubkey"]
SPLITS = ("train", "eval")


@lru_cache(maxsize=None)
def load_template(name: str) -> str:
    """Text of ``kvlib/tasks/templates/<name>.txt`` (kept as files, like LitM's prompts)."""
    return resources.files("kvlib.tasks").joinpath("templates", f"{name}.txt").read_text(encoding="utf-8")


def _num_integers(digits: tuple[int, int]) -> int:
    """How many distinct integers have between digits[0] and digits[1] decimal digits."""
    return 10 ** digits[1] - 10 ** (digits[0] - 1)


@dataclass
class GenerationConfig:
    """One synthetic dataset (train + eval split). Defaults are the paper's simple-task config."""

    task: Task = "simple"
    template: bool = True
    num_dicts: int = 85
    gold_dict_size: int = 3
    dict_size_range: tuple[int, int] = (3, 4)
    key_digits: tuple[int, int] = (3, 4)  # digits of each key (simple) or subkey (multisubkey)
    value_digits: tuple[int, int] = (3, 4)
    # multisubkey only (the paper does not publish its values; these are kvlib's defaults)
    gold_subkeys: int = 3  # subkeys in the gold key
    subkeys_per_key: tuple[int, int] = (2, 3)  # subkeys in each distractor key
    common_subkeys: int = 2  # how many of the gold key's subkeys distractors may share
    prob_share_common: float = 0.5  # probability that a distractor key draws on the common subkeys
    prob_per_common: float = 0.5  # then, probability of taking each common subkey
    # length budget: prompt tokens + reserve_tokens <= max_tokens (official: 4096 - 100, the reserve
    # leaves room for the chat template and the answer)
    max_tokens: int = 4096
    reserve_tokens: int = 100
    tokenizer: str = "smollm2-135m-instruct"
    n_train: int = 350
    n_eval: int = 150
    seed: int = 0
    # gold position: uniform, except frac_first of the samples at the first dictionary and
    # frac_first_5pct in the first 5% of dictionaries (official config 0.05 / 0.03; the official code
    # takes "5%" of the *sample count*, a bug; here it is 5% of the dictionaries, at least one)
    frac_first: float = 0.05
    frac_first_5pct: float = 0.03
    max_resample: int = 1000  # redraws of one sample before giving up on the length budget

    def validate(self) -> None:
        check_positive("num_dicts", self.num_dicts)
        check_positive("gold_dict_size", self.gold_dict_size)
        check_range("dict_size_range", self.dict_size_range, minimum=1)
        check_range("key_digits", self.key_digits, minimum=1)
        check_range("value_digits", self.value_digits, minimum=1)
        check_positive("n_train", self.n_train, 0)
        check_positive("n_eval", self.n_eval, 0)
        if self.n_train + self.n_eval == 0:
            fail("n_train", "n_train + n_eval must be >= 1")
        check_positive("max_tokens", self.max_tokens)
        check_positive("reserve_tokens", self.reserve_tokens, 0)
        if self.reserve_tokens >= self.max_tokens:
            fail("max_tokens", f"must exceed reserve_tokens={self.reserve_tokens}, got {self.max_tokens}")
        check_positive("max_resample", self.max_resample)
        check_fraction("frac_first", self.frac_first)
        check_fraction("frac_first_5pct", self.frac_first_5pct)
        if self.frac_first + self.frac_first_5pct > 1:
            fail("frac_first_5pct", "frac_first + frac_first_5pct must be <= 1")
        if not self.tokenizer:
            fail("tokenizer", "must name a tokenizer")
        largest_dict = max(self.gold_dict_size, self.dict_size_range[1])
        n_keys = _num_integers(self.key_digits)
        if self.task == "simple":
            # keys within a dict are distinct and never equal the gold key or gold value
            if n_keys < largest_dict + 2:
                fail("key_digits", f"{self.key_digits} gives {n_keys} distinct keys, too few for unique keys "
                                   f"in dictionaries of up to {largest_dict} entries")
        else:
            check_positive("gold_subkeys", self.gold_subkeys, 2)
            check_range("subkeys_per_key", self.subkeys_per_key, minimum=2)
            check_positive("common_subkeys", self.common_subkeys, 0)
            if self.common_subkeys >= self.gold_subkeys:
                fail("common_subkeys", f"must be < gold_subkeys={self.gold_subkeys} (a distractor holding every "
                                       f"gold subkey would make the question ambiguous), got {self.common_subkeys}")
            check_fraction("prob_share_common", self.prob_share_common)
            check_fraction("prob_per_common", self.prob_per_common)
            need = max(self.gold_subkeys, self.subkeys_per_key[1]) + largest_dict + 1
            if n_keys < need:
                fail("key_digits", f"{self.key_digits} gives {n_keys} distinct subkeys, too few for distinct "
                                   f"subkeys and keys (need at least {need})")
        if _num_integers(self.value_digits) < 2:
            fail("value_digits", f"{self.value_digits} gives fewer than 2 distinct values")

    @property
    def first_5pct_dicts(self) -> int:
        return max(1, math.ceil(0.05 * self.num_dicts))


@dataclass
class Sample:
    """One prompt/answer pair plus what evaluation needs to score it by position."""

    prompt: str
    answer: str
    meta: dict

    def messages(self, system: str | None = None) -> list[dict]:
        msgs = [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]
        if system is not None:
            msgs.insert(0, {"role": "system", "content": system})
        return msgs


# ---------------------------------------------------------------- drawing dictionaries

def _draw_int(rng: random.Random, digits: tuple[int, int]) -> int:
    n = rng.randint(digits[0], digits[1])
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def _fill_dictionaries(rng: random.Random, cfg: GenerationConfig, gold_pos: int, gold_key, gold_value: int,
                       draw_key: Callable[[], object], value_allowed: Callable[[int], bool]) -> tuple[list[dict], int]:
    """The num_dicts dictionaries: at gold_pos the gold dictionary (gold_dict_size entries, the gold pair in
    a random slot), elsewhere dictionaries of random size. Distractor keys come from draw_key() and are
    distinct within a dictionary; distractor values are redrawn until value_allowed(value)."""

    def make(size: int, gold_slot: int = -1) -> dict:
        d: dict = {}
        for slot in range(size):
            if slot == gold_slot:
                d[gold_key] = gold_value
                continue
            key = draw_key()
            while key in d:
                key = draw_key()
            value = _draw_int(rng, cfg.value_digits)
            while not value_allowed(value):
                value = _draw_int(rng, cfg.value_digits)
            d[key] = value
        return d

    gold_slot = rng.randrange(cfg.gold_dict_size)
    dicts = [make(cfg.gold_dict_size, gold_slot) if i == gold_pos else make(rng.randint(*cfg.dict_size_range))
             for i in range(cfg.num_dicts)]
    return dicts, gold_slot


def _draw_simple(rng: random.Random, cfg: GenerationConfig, gold_pos: int) -> tuple[list[dict], dict]:
    """Dictionaries for the simple task. The gold key and gold value each occur exactly once among all
    integers of the prompt (no distractor key or value equals either)."""
    gold_key = _draw_int(rng, cfg.key_digits)
    gold_value = _draw_int(rng, cfg.value_digits)
    while gold_value == gold_key:
        gold_value = _draw_int(rng, cfg.value_digits)
    reserved = {gold_key, gold_value}

    def draw_key() -> int:
        key = _draw_int(rng, cfg.key_digits)
        while key in reserved:
            key = _draw_int(rng, cfg.key_digits)
        return key

    dicts, gold_slot = _fill_dictionaries(rng, cfg, gold_pos, gold_key, gold_value, draw_key,
                                          lambda v: v not in reserved)
    return dicts, {"key": gold_key, "value": gold_value, "key_index": gold_slot}


def _draw_multisubkey(rng: random.Random, cfg: GenerationConfig, gold_pos: int) -> tuple[list[dict], dict]:
    """Dictionaries for the multi-subkey task. Subkeys within a key are distinct; no distractor key
    contains every gold subkey (so the shuffled question has one answer); the gold value occurs once
    among all integers, and no distractor value equals a gold subkey."""
    gold_key: list[int] = []
    while len(gold_key) < cfg.gold_subkeys:
        s = _draw_int(rng, cfg.key_digits)
        if s not in gold_key:
            gold_key.append(s)
    gold_set = set(gold_key)
    gold_value = _draw_int(rng, cfg.value_digits)
    while gold_value in gold_set:
        gold_value = _draw_int(rng, cfg.value_digits)
    common = rng.sample(gold_key, cfg.common_subkeys)

    def draw_key() -> tuple[int, ...]:
        size = rng.randint(*cfg.subkeys_per_key)
        while True:
            key: list[int] = []
            if rng.random() < cfg.prob_share_common:
                for s in common:
                    if len(key) < size and rng.random() < cfg.prob_per_common:
                        key.insert(rng.randint(0, len(key)), s)
            while len(key) < size:
                s = _draw_int(rng, cfg.key_digits)
                if s not in key and s != gold_value:
                    key.insert(rng.randint(0, len(key)), s)
            if not gold_set.issubset(key):
                return tuple(key)

    dicts, gold_slot = _fill_dictionaries(rng, cfg, gold_pos, tuple(gold_key), gold_value, draw_key,
                                          lambda v: v != gold_value and v not in gold_set)
    query = list(gold_key)
    rng.shuffle(query)
    return dicts, {"key": tuple(gold_key), "value": gold_value, "key_index": gold_slot, "query_subkeys": query}


# ---------------------------------------------------------------- rendering

def format_key(key: int | tuple[int, ...]) -> str:
    """`122` for a simple key, `(122, 765, 9)` for a multi-subkey key (Python's repr)."""
    return repr(key) if isinstance(key, tuple) else str(key)


def format_dictionary(name: int, d: dict) -> str:
    """`Dictionary [3] {122: 765, 4548: 1475}`: the paper's line format (Python dict repr)."""
    return f"Dictionary [{name}] {{{', '.join(f'{format_key(k)}: {v}' for k, v in d.items())}}}"


def render(cfg: GenerationConfig, dicts: Sequence[dict], gold: dict, gold_pos: int) -> tuple[str, str]:
    """Prompt and answer text for one sample. Dictionary names are 1..N in order."""
    dictionaries = "\n".join(format_dictionary(i + 1, d) for i, d in enumerate(dicts))
    name = gold_pos + 1
    if cfg.task == "simple":
        fields = {"key": gold["key"]}
    else:
        fields = {"subkeys": ", ".join(map(str, gold["query_subkeys"]))}
    prompt = load_template(f"{cfg.task}.prompt").format(dictionaries=dictionaries, **fields)
    if cfg.template:
        prompt += load_template(f"{cfg.task}.template").format(**fields)
    answer = load_template(f"{cfg.task}.answer").format(
        **{**fields, "key": format_key(gold["key"]), "value": gold["value"], "name": name}
    )
    return prompt, answer


# ---------------------------------------------------------------- positions and splits

def gold_positions(cfg: GenerationConfig, n: int, rng: random.Random) -> list[int]:
    """0-based gold dictionary index for each of n samples (see GenerationConfig.frac_first)."""
    order = list(range(n))
    rng.shuffle(order)
    n_first = int(n * cfg.frac_first)
    n_5pct = int(n * cfg.frac_first_5pct)
    positions = [rng.randrange(cfg.num_dicts) for _ in range(n)]
    for i in order[:n_first]:
        positions[i] = 0
    for i in order[n_first:n_first + n_5pct]:
        positions[i] = rng.randrange(cfg.first_5pct_dicts)
    return positions


def _split_streams(cfg: GenerationConfig, split: str, n: int) -> tuple[list[int], list[random.Random]]:
    positions = gold_positions(cfg, n, random.Random(f"kvlib/{cfg.seed}/{split}/positions"))
    return positions, [random.Random(f"kvlib/{cfg.seed}/{split}/{i}") for i in range(n)]


def _prompt_budget(cfg: GenerationConfig) -> int:
    return cfg.max_tokens - cfg.reserve_tokens


def check_budget_feasible(cfg: GenerationConfig, count_tokens: Callable[[list[str]], list[int]]) -> None:
    """Fail fast when even the shortest possible prompt of this config exceeds the budget."""
    rng = random.Random(0)
    small = dataclasses.replace(
        cfg,
        dict_size_range=(cfg.dict_size_range[0],) * 2,
        key_digits=(cfg.key_digits[0],) * 2,
        value_digits=(cfg.value_digits[0],) * 2,
        subkeys_per_key=(cfg.subkeys_per_key[0],) * 2,
    )
    draw = _draw_simple if cfg.task == "simple" else _draw_multisubkey
    dicts, gold = draw(rng, small, 0)
    (n,) = count_tokens([render(small, dicts, gold, 0)[0]])
    if n > _prompt_budget(cfg):
        fail("max_tokens", f"{cfg.max_tokens} is too small: the shortest possible prompt of this config has about "
                           f"{n} tokens, plus reserve_tokens={cfg.reserve_tokens}")


def generate_split(
    cfg: GenerationConfig,
    split: str,
    n: int,
    count_tokens: Callable[[list[str]], list[int]],
    exclude_prompts: set[str] | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    positions: Sequence[int] | None = None,
) -> list[Sample]:
    """Draw n samples; each is redrawn (from its own stream) until it fits the token budget and its
    prompt is not in exclude_prompts (hashes of the other split's prompts: eval never repeats train).
    `positions` (0-based gold dictionary per sample, n of them) overrides the config's position draw: the
    position x length grid of notebook 07 asks for each cell's position explicitly."""
    exclude = exclude_prompts or set()
    draw = _draw_simple if cfg.task == "simple" else _draw_multisubkey
    drawn_positions, rngs = _split_streams(cfg, split, n)
    if positions is None:
        positions = drawn_positions
    elif len(positions) != n or not all(isinstance(p, int) and 0 <= p < cfg.num_dicts for p in positions):
        raise ValueError(f"positions must be {n} integers in [0, {cfg.num_dicts})")
    budget = _prompt_budget(cfg)
    samples: list[Sample | None] = [None] * n
    attempts = [0] * n
    pending = list(range(n))
    while pending:
        batch, pending = pending[:batch_size], pending[batch_size:]
        drawn = []
        for i in batch:
            attempts[i] += 1
            dicts, gold = draw(rngs[i], cfg, positions[i])
            drawn.append((i, gold, *render(cfg, dicts, gold, positions[i])))
        counts = count_tokens([prompt for _, _, prompt, _ in drawn])
        retry = []
        for (i, gold, prompt, answer), n_tokens in zip(drawn, counts):
            if n_tokens <= budget and _prompt_hash(prompt) not in exclude:
                samples[i] = Sample(prompt, answer, _meta(cfg, split, i, positions[i], gold, n_tokens, attempts[i]))
                if progress:
                    progress(1)
            elif attempts[i] >= cfg.max_resample:
                raise ParamError(
                    f"max_tokens: sample {split}[{i}] did not fit {budget} prompt tokens (or kept repeating a "
                    f"train prompt) after {attempts[i]} draws (last: {n_tokens} tokens); lower num_dicts or "
                    f"dict_size_range, or raise max_tokens"
                )
            else:
                retry.append(i)
        pending = retry + pending
    return samples  # type: ignore[return-value]


def _prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def _meta(cfg: GenerationConfig, split: str, i: int, pos: int, gold: dict, n_tokens: int, attempts: int) -> dict:
    meta = {
        "id": f"{cfg.task}-{'t' if cfg.template else 'n'}-s{cfg.seed}-{split}-{i:05d}",
        "task": cfg.task,
        "template": cfg.template,
        "split": split,
        "seed": cfg.seed,
        "num_dicts": cfg.num_dicts,
        "gold_position": pos + 1,  # 1-based, = the gold dictionary's name
        "gold_dict_name": str(pos + 1),
        "gold_key_index": gold["key_index"],
        "key": list(gold["key"]) if isinstance(gold["key"], tuple) else gold["key"],
        "value": gold["value"],
        "n_tokens": n_tokens,
        "draws": attempts,
        "tokenizer": cfg.tokenizer,
    }
    if "query_subkeys" in gold:
        meta["query_subkeys"] = gold["query_subkeys"]
    return meta


def generate(
    cfg: GenerationConfig,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    progress: bool = False,
) -> dict[str, list[Sample]]:
    """Both splits of a dataset. count_tokens defaults to the config's tokenizer."""
    if count_tokens is None:

        count_tokens = load_token_counter(cfg.tokenizer).count
    check_budget_feasible(cfg, count_tokens)
    bar = None
    if progress:

        bar = tqdm(total=cfg.n_train + cfg.n_eval, desc=f"generate {cfg.task}", unit="sample")
    try:
        train = generate_split(cfg, "train", cfg.n_train, count_tokens, progress=bar.update if bar else None)
        eval_ = generate_split(cfg, "eval", cfg.n_eval, count_tokens,
                               exclude_prompts={_prompt_hash(s.prompt) for s in train},
                               progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    return {"train": train, "eval": eval_}


def position_length_grid(cfg: GenerationConfig, num_dicts: Sequence[int], relative_positions: Sequence[float],
                         per_cell: int, count_tokens: Callable[[list[str]], list[int]] | None = None,
                         exclude_prompts: set[str] | None = None) -> list[Sample]:
    """Samples of `cfg`'s task on a grid of context lengths (number of dictionaries) x gold positions
    (fractions of the way through the context: 0 = first dictionary, 1 = last), `per_cell` per cell.
    Each length draws from its own streams (split "grid-<num_dicts>"), so the grid is deterministic per seed
    and independent of the other cells; `exclude_prompts` (hashes of training prompts) are never repeated."""
    if count_tokens is None:

        count_tokens = load_token_counter(cfg.tokenizer).count
    if per_cell < 1 or not num_dicts or not relative_positions:
        raise ValueError("the grid needs per_cell >= 1 and at least one length and one position")
    if not all(0.0 <= r <= 1.0 for r in relative_positions):
        raise ValueError(f"relative_positions must be fractions in [0, 1], got {list(relative_positions)}")
    samples = []
    for d in num_dicts:
        cell_cfg = dataclasses.replace(cfg, num_dicts=d)
        cell_cfg.validate()
        check_budget_feasible(cell_cfg, count_tokens)
        cells = [r for r in relative_positions for _ in range(per_cell)]
        drawn = generate_split(cell_cfg, f"grid-{d}", len(cells), count_tokens, exclude_prompts=exclude_prompts,
                               positions=[round(r * (d - 1)) for r in cells])
        for sample, r in zip(drawn, cells):  # the cell asked for (the position is its nearest dictionary)
            sample.meta["grid_relative_position"] = r
        samples += drawn
    return samples


def prompt_hashes(samples: Iterable[Sample]) -> set[str]:
    """Hashes of the samples' prompts (for exclude_prompts: evaluation never repeats a training prompt)."""
    return {_prompt_hash(s.prompt) for s in samples}


# ---------------------------------------------------------------- files

def _dump_jsonl(path: Path, rows: Iterable[dict]) -> None:
    # One fixed serialisation (key order as built, ASCII, "\n" line ends) => byte-identical files.
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=True) + "\n")


def token_stats(samples: Sequence[Sample]) -> dict:
    counts = [s.meta["n_tokens"] for s in samples]
    if not counts:
        return {"n": 0}
    return {
        "n": len(counts),
        "min": min(counts),
        "mean": round(statistics.fmean(counts), 1),
        "median": statistics.median(counts),
        "max": max(counts),
        "mean_draws": round(statistics.fmean(s.meta["draws"] for s in samples), 3),
    }


def write_split(out_dir: Path, split: str, samples: Sequence[Sample], system: str | None = None) -> dict:
    """Write one split's `<split>.jsonl` (HF chat format: what `kvlib train` reads), `<split>.openai.jsonl`
    (with `system`, default the paper's system message) and the aligned `<split>.meta.jsonl`; returns its
    token_stats. The one writer of chat datasets: synthetic sets and the baselines (kvlib.tasks.baseline_sets)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    system = load_template("openai_system") if system is None else system
    _dump_jsonl(out_dir / f"{split}.jsonl", ({"messages": s.messages()} for s in samples))
    _dump_jsonl(out_dir / f"{split}.openai.jsonl", ({"messages": s.messages(system)} for s in samples))
    _dump_jsonl(out_dir / f"{split}.meta.jsonl", (s.meta for s in samples))
    return token_stats(samples)


def write_dataset(cfg: GenerationConfig, out_dir: Path, progress: bool = False) -> dict:
    """Generate and write, per split: `<split>.jsonl` (HF chat format, no system message),
    `<split>.openai.jsonl` (OpenAI fine-tuning format with the paper's system message),
    `<split>.meta.jsonl` (one metadata row per line, aligned); plus `config.json` and `stats.json`."""
    data = generate(cfg, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    system = load_template("openai_system")
    stats = {"config": to_mapping(cfg), "splits": {}}
    for split, samples in data.items():
        stats["splits"][split] = write_split(out_dir, split, samples, system)
    (out_dir / "config.json").write_text(json.dumps(to_mapping(cfg), indent=2, sort_keys=True) + "\n")
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return {"out_dir": str(out_dir), **stats}


def check_out_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse, before any generation, an output that is in the way: a file (a dataset is a directory), or a
    directory that already holds files (a dataset, or anything else) unless `overwrite` (`kvlib generate
    --force`), which rewrites the dataset's files there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: --out is an existing file; a dataset is written as a directory: choose "
                         f"another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        what = "a dataset" if (out_dir / "config.json").is_file() else "files"
        raise InputError(f"{out_dir}: --out already holds {what}; choose another --out, or pass --force to "
                         f"overwrite it")


def format_stats(result: dict) -> str:
    cfg = result["config"]
    lines = [f"wrote {result['out_dir']}  (task={cfg['task']}, template={cfg['template']}, "
             f"num_dicts={cfg['num_dicts']}, tokenizer={cfg['tokenizer']}, seed={cfg['seed']})",
             f"prompt tokens (budget {cfg['max_tokens']} - {cfg['reserve_tokens']} reserve):"]
    for split, st in result["splits"].items():
        if st["n"]:
            lines.append(f"  {split:5s} n={st['n']:5d}  min={st['min']}  mean={st['mean']}  median={st['median']}"
                         f"  max={st['max']}  draws/sample={st['mean_draws']}")
        else:
            lines.append(f"  {split:5s} n=0")
    return "\n".join(lines)


def load_dataset(out_dir: Path, split: str) -> list[Sample]:
    """Read back a split written by write_dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    chats = read_jsonl(Path(out_dir) / f"{split}.jsonl")
    metas = read_jsonl(Path(out_dir) / f"{split}.meta.jsonl")
    if len(chats) != len(metas):
        raise ValueError(f"{out_dir}: {split}.jsonl has {len(chats)} rows but {split}.meta.jsonl has {len(metas)}")
    return [Sample(c["messages"][0]["content"], c["messages"][1]["content"], m) for c, m in zip(chats, metas)]


# ---------------------------------------------------------------- params

def config_from_sources(params_file: Path | None, overrides: dict) -> GenerationConfig:
    """GenerationConfig from an optional YAML file (top-level keys, or under `generation:`) plus CLI
    overrides; validated as a whole."""
    data = params_section(load_yaml(params_file), "generation")[0] if params_file is not None else {}
    data.update(overrides)
    return from_mapping(GenerationConfig, data)


def preview(sample: Sample, head: int = 3, tail: int = 1) -> str:
    """The prompt with the middle dictionaries elided, for showing examples (Figs. 1-3)."""
    lines = sample.prompt.split("\n")
    dict_rows = [i for i, line in enumerate(lines) if line.startswith("Dictionary [")]
    if len(dict_rows) <= head + tail + 1:
        return sample.prompt
    cut_from, cut_to = dict_rows[head], dict_rows[-tail]
    gold = next(i for i in dict_rows if lines[i].startswith(f"Dictionary [{sample.meta['gold_dict_name']}] "))
    kept = lines[:cut_from]
    if cut_from <= gold < cut_to:  # always show the gold dictionary
        kept += ([f"... ({gold - cut_from} dictionaries)"] if gold > cut_from else []) + [lines[gold]]
        kept += [f"... ({cut_to - gold - 1} dictionaries)"] if cut_to - gold > 1 else []
    else:
        kept += [f"... ({cut_to - cut_from} dictionaries)"]
    return "\n".join(kept + lines[cut_to:])


def examples_markdown(samples: Mapping[str, Sequence[Sample]], per_dataset: int = 1) -> str:
    """The first `per_dataset` samples of each dataset as Markdown (prompt previewed, then the target answer):
    the paper's Figs. 1-3 (simple task, multi-subkey task, the answer template) drawn from our data."""
    parts = []
    for name, rows in samples.items():
        for s in list(rows)[:per_dataset]:
            parts.append(f"**{name}** (task `{s.meta['task']}`, template {s.meta['template']}, "
                         f"{s.meta['n_tokens']} prompt tokens, gold in dictionary {s.meta['gold_dict_name']})\n\n"
                         f"```\n{preview(s)}\n```\n\nTarget answer: `{s.answer}`\n")
    return "\n".join(parts)


def stats_rows(name: str, result: dict) -> list[dict]:
    """Rows of the token-length table for one written dataset (one row per split)."""
    cfg = result["config"]
    columns = ("n", "min", "mean", "median", "max", "mean_draws")  # fixed order, fresh or read from stats.json
    return [
        {"dataset": name, "split": split, "task": cfg["task"], "template": cfg["template"],
         "num_dicts": cfg["num_dicts"], "tokenizer": cfg["tokenizer"], "seed": cfg["seed"],
         "budget": cfg["max_tokens"] - cfg["reserve_tokens"],
         **{c: result["splits"][split].get(c) for c in columns}}
        for split in SPLITS if split in result["splits"]
    ]


def ensure_dataset(cfg: GenerationConfig, out_dir: Path, progress: bool = False) -> dict:
    """Write the dataset unless out_dir already holds it for this exact config; returns its stats.
    (Generation is deterministic, so reuse and regeneration give the same bytes.)"""
    out_dir = Path(out_dir)
    stats_file = out_dir / "stats.json"
    files = [out_dir / f"{s}{x}" for s in SPLITS for x in (".jsonl", ".openai.jsonl", ".meta.jsonl")]
    if stats_file.is_file() and all(f.is_file() for f in files):
        stats = json.loads(stats_file.read_text())
        if stats.get("config") == to_mapping(cfg):
            return {"out_dir": str(out_dir), **stats}
    return write_dataset(cfg, out_dir, progress=progress)


# Where a key-value answer ends for its scorer: generation stops there (kvlib.engine.backends.StopRule; part of
# the response-cache key). kvlib.engine.scoring.score_kv_answer reads the first value phrase, the first
# "Dictionary [i]" and (multi-subkey) the first key tuple holding the queried subkeys: the answer template gives
# them in that order and ends with "... Dictionary [i].", so the answer ends at the first "Dictionary [i]." after
# a "value". (LitM key-value retrieval, kvlib.tasks.litm_kv, looks for the value anywhere in the reply, and
# FLenQA's verdict, kvlib.engine.scoring.parse_true_false, may be its last word: neither has a stop rule.)
KV_ANSWER_END = StopRule(pattern=r"(?is)\bvalue\b.*?\bdictionary \[\d+\]\.")


def evaluate_kv(backend, samples: Sequence[Sample], max_new_tokens: int, label: str) -> list[dict]:
    """Answer synthetic key-value prompts (user turn only, as in training) and score each answer, each row with
    the model's identity (kvlib.engine.evaluate.result_fields: which weights answered). Over-length prompts are
    never skipped: the backend raises, naming them."""
    requests = [[{"role": "user", "content": s.prompt}] for s in samples]
    answers = generate_until(backend, requests, max_new_tokens, KV_ANSWER_END)
    fields = result_fields(backend, max_new_tokens, KV_ANSWER_END)
    rows = []
    for s, answer in zip(samples, answers):
        scores = score_kv_answer(answer, s.meta)
        rows.append({"model": label, "id": s.meta["id"], "task": s.meta["task"], "template": s.meta["template"],
                     "gold_position": s.meta["gold_position"], "n_tokens": s.meta["n_tokens"],
                     "response": answer, **scores, **fields})
    return rows


def evaluate_kv_grid(backend: Any, samples: Sequence[Sample], max_new_tokens: int, label: str) -> list[dict]:
    """Synthetic key-value samples of kvlib.tasks.synthetic.position_length_grid, scored like evaluate_kv, with the
    cell (number of dictionaries, relative gold position) and over-length prompts counted (correct None)."""
    requests = [[{"role": "user", "content": s.prompt}] for s in samples]
    answers = answer_requests(backend, requests, max_new_tokens, KV_ANSWER_END)
    fields = result_fields(backend, max_new_tokens, KV_ANSWER_END)
    rows = []
    for s, answer in zip(samples, answers):
        scores = score_kv_answer(answer, s.meta) if answer is not None else {
            k: None for k in score_kv_answer("", s.meta)}
        d, pos = s.meta["num_dicts"], s.meta["gold_position"]
        rows.append({"model": label, "id": s.meta["id"], "num_dicts": d, "gold_position": pos,
                     "relative_position": s.meta["grid_relative_position"],
                     "n_tokens": s.meta["n_tokens"], "response": answer, "over_length": answer is None,
                     **scores, **fields})
    return rows


def position_bin_index(position: int, num_dicts: int, bins: int) -> int:
    """1-based index of the equal-width bin that a 1-based gold position among num_dicts falls in."""
    return min(int((position - 1) / (num_dicts / bins)), bins - 1) + 1


def position_bin(position: int, num_dicts: int, bins: int) -> str:
    """Label of the equal-width bin of a 1-based gold position among num_dicts, e.g. "1-4"."""
    width = num_dicts / bins
    b = position_bin_index(position, num_dicts, bins) - 1
    low, high = int(b * width) + 1, int((b + 1) * width)
    return f"{low}-{high}" if high > low else str(low)
