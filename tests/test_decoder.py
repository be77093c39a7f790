"""kvlib's greedy decoder (HFBackend decoder "kvlib"), prefix reuse and stop rules.

The decoder must give token-for-token the greedy output of plain `model.generate` in float32, with rows of
different lengths decoded together and leaving the batch at different steps; prefix reuse must answer like each
prompt alone; a stop rule must end decoding early and leave every task's score as decoding the full budget
does. Uses the embedded model (session fixtures in conftest.py); the per-task score checks are marked slow."""
from __future__ import annotations

import random
import re

import pytest
import torch

from kvlib.engine import backends, data
from kvlib.engine.backends import HFBackend, StopRule, _attend_after_prefix, generate_until, to_messages
from kvlib.engine.cache import CachedBackend, ResponseCache, cache_key, generation_params
from kvlib.engine.scoring import score_kv_answer, score_mdqa_answer
from kvlib.engine.train import resolve_precision
from kvlib.tasks import general, mdqa, synthetic
from kvlib.tasks.mdqa import MDQA_ANSWER_END
from kvlib.tasks.synthetic import KV_ANSWER_END

LONG_ANSWERS = [
    "Write a short poem about the sea, in three lines.",
    "What is 2+2?",
    "List three fruits, one per line.",
    "Dictionary [3] {122: 765, 4548: 1475}\nWhat is the value of key 4548?",
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a color."}],
    "Explain in two sentences why the sky is blue.",
    "Count from one to ten in words, separated by commas.",
]
MAX_NEW = 20


def reference_tokens(backend: HFBackend, request, max_new_tokens: int) -> list[int]:
    """Plain transformers generate() on one prompt, greedy, stopping at the end of the turn: its new tokens."""
    (ids,) = backend._encode_prompts([request])
    with torch.inference_mode():
        output = backend.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        eos_token_id=backend.stop_ids, pad_token_id=backend.pad_id)
    return output[0, len(ids):].tolist()


def decoded_tokens(backend: HFBackend, requests, max_new_tokens: int, stop=None) -> list[list[int]]:
    """The tokens kvlib's decoder generated for each request (its rows, in request order)."""
    tokens: dict[int, list[int]] = {}
    last: list = []
    decode_answer = backend._decode_answer

    def recording(row_tokens):
        last.append(list(row_tokens))
        return decode_answer(row_tokens)

    backend._decode_answer = recording  # an instance attribute over the method, removed below
    try:
        backend.generate(requests, max_new_tokens, on_result=lambda i, answer: tokens.__setitem__(i, last[-1]),
                         stop=stop)
    finally:
        del backend._decode_answer
    return [tokens[i] for i in range(len(requests))]


def test_kvlib_decoder_is_the_default_on_cpu(hf_backend):
    assert hf_backend.decoder == "kvlib"
    assert backends.kvlib_decoder_unsupported(hf_backend.model, torch.device("cpu")) is None
    assert "not cuda" in backends.kvlib_decoder_unsupported(hf_backend.model, torch.device("cuda"))


def test_decoder_matches_generate_token_for_token(hf_backend, monkeypatch):
    # batch_size 3: batches of rows of different lengths (masked columns), rows that end at different steps
    assert hf_backend.batch_size == 3
    steps = []
    step = hf_backend._step
    monkeypatch.setattr(hf_backend, "_step", lambda *a: steps.append(a[4]) or step(*a))
    ours = decoded_tokens(hf_backend, LONG_ANSWERS, MAX_NEW)
    assert any(layout.decode and layout.mask is not None for layout in steps)  # padded rows were decoded
    assert any(layout.decode and layout.rows < 3 for layout in steps)  # some rows left their batch early
    for request, tokens in zip(LONG_ANSWERS, ours):
        assert tokens == reference_tokens(hf_backend, request, MAX_NEW), request
    lengths = {len(t) for t in ours}
    assert len(lengths) > 2 and max(lengths) == MAX_NEW  # ends of turn at different steps, and the budget


def test_prefix_reuse_answers_like_each_prompt_alone(hf_backend, monkeypatch):
    context = ("Dictionary [1] {122: 765, 4548: 1475, 93: 3021}\nDictionary [2] {77: 12, 5012: 8810}\n"
               "Dictionary [3] {640: 118, 2291: 57, 9: 4410}\n")
    prompts = [context + f"What is the value of key {key}? Answer with the number." for key in (4548, 5012, 93, 2291)]
    prompts += [LONG_ANSWERS[0], context + "Which dictionary holds the key 640?"]
    alone = [reference_tokens(hf_backend, p, 12) for p in prompts]
    fed = []
    step = hf_backend._step
    monkeypatch.setattr(hf_backend, "_step", lambda model, ids, *a: fed.append((len(ids[0]), a[2])) or step(model, ids, *a))
    monkeypatch.setattr(hf_backend, "prefix_cache", True)
    assert decoded_tokens(hf_backend, prompts, 12) == alone
    ids = hf_backend._encode_prompts(prompts)
    order = sorted(range(len(prompts)), key=ids.__getitem__)
    prefills = [(n, layout.past) for n, layout in fed if not layout.decode]
    assert [past for _, past in prefills] == [0] + [backends.shared_prefix_length(ids[a], ids[b])
                                                   for a, b in zip(order, order[1:])]
    assert [n + past for n, past in prefills] == [len(ids[i]) for i in order]  # only the suffix was fed
    assert sum(n for n, _ in prefills) < 0.6 * sum(map(len, ids))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_attention_after_a_prefix_equals_one_masked_pass(dtype, tolerance):
    torch.manual_seed(0)
    for heads, kv_heads, past, new in ((9, 3, 40, 17), (4, 4, 5, 1), (6, 2, 1, 30)):
        q = torch.randn(1, heads, new, 16, dtype=dtype)
        k, v = (torch.randn(1, kv_heads, past + new, 16, dtype=dtype) for _ in range(2))
        visible = torch.ones(new, past + new, dtype=torch.bool).tril(past)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.25,
                                                                    enable_gqa=heads != kv_heads)
        got = _attend_after_prefix(q, k, v, past, 0.25)
        assert got.dtype == dtype and got.shape == expected.shape
        assert (got.float() - expected.float()).abs().max().item() < tolerance


def test_decode_batches_are_planned_in_order_and_bounded():
    assert backends.plan_decode_batches([10, 30, 20, 5], 2, 2, 10**6) == [[0, 1], [2, 3]]
    assert backends.plan_decode_batches([10, 30, 20, 5], 2, 8, 70) == [[0, 1], [2, 3]]  # 2 x 32 <= 70 < 3 x 32
    assert backends.plan_decode_batches([100, 5], 2, 8, 50) == [[0], [1]]  # too long for the cap: alone
    assert backends.plan_decode_batches([], 2, 8, 50) == []


# ------------------------------------------------------------------------------------------ stop rules


def test_stop_rule_cuts():
    first = StopRule(first_line=True)
    assert first.cut("\n\n  Paris is the answer.\nMore text") == "Paris is the answer."
    assert first.cut("  Paris") is None and first.apply("  Paris \n") == "Paris"
    assert first.cut("\n\n") is None  # no text yet: a first line has not started
    until = StopRule(strings=("Q:", "\n\n"))
    assert until.cut("The answer is 4.\n\nQ: next") == "The answer is 4."
    assert until.cut("The answer is 4. Q: next") == "The answer is 4."
    kv = StopRule(pattern=r"(?is)\bvalue\b.*?\bdictionary \[\d+\]\.")
    assert kv.cut("The value of key 5 is 7 and it is in Dictionary [3]. Also Dictionary [4].") == \
        "The value of key 5 is 7 and it is in Dictionary [3]."
    assert kv.cut("It is in Dictionary [3]. The value") is None
    assert StopRule(strings="Q:").strings == ("Q:",)
    overlapping = StopRule(strings=("abc", "b"))
    assert overlapping.cut("xab") is None and overlapping.cut("xabc") == "x"  # "abc" may still start first
    assert overlapping.cut("xbd") == "x"
    with pytest.raises(ValueError):
        StopRule()
    with pytest.raises(TypeError):
        StopRule(strings=("",))
    with pytest.raises(re.error):
        StopRule(pattern="(")
    assert first.key() == {"first_line": True, "strings": [], "pattern": None}
    assert "first line" in first.describe()


def test_a_cut_found_while_decoding_is_the_cut_of_the_whole_reply():
    """What lets a decoder stop at the first text where the rule fires: that text's answer is the whole
    reply's."""
    rng = random.Random(0)
    pieces = [" the", " value", " of key 12 is 7", " and", " it is in", " Dictionary [", "3", "]", ".", "\n",
              "\n\n", " Q:", "Q", ":", " Paris", " dictionary [4].", " 1,", "."]
    rules = [MDQA_ANSWER_END, KV_ANSWER_END, StopRule(strings=("Q:",)), StopRule(first_line=True, strings=(".",)),
             StopRule(strings=(":", "Q: ", "\n\n"))]
    for _ in range(300):
        tokens = [rng.choice(pieces) for _ in range(rng.randint(1, 25))]
        whole = "".join(tokens)
        for rule in rules:
            for n in range(1, len(tokens) + 1):
                answer = rule.cut("".join(tokens[:n]))
                if answer is not None:  # the first prefix where it fires
                    assert answer == rule.apply(whole), (rule, tokens[:n], whole)
                    break


def test_stop_rule_ends_decoding_early(hf_backend, monkeypatch):
    request = "List three fruits, one per line."
    (whole,) = hf_backend.generate([request], 24)
    assert "\n" in whole
    steps = []
    step = hf_backend._step
    monkeypatch.setattr(hf_backend, "_step", lambda *a: steps.append(a[4]) or step(*a))
    (stopped,) = hf_backend.generate([request], 24, stop=StopRule(first_line=True))
    assert stopped == whole.split("\n")[0].strip()
    assert sum(layout.decode for layout in steps) < len(hf_backend.tokenizer(whole)["input_ids"]) - 1
    # decoder "generate" and backends without stop rules cut whole replies: the same answer
    monkeypatch.setattr(hf_backend, "decoder", "generate")
    assert hf_backend.generate([request], 24, stop=StopRule(first_line=True)) == [stopped]

    class OldBackend:  # the protocol before stop rules
        def generate(self, requests, max_new_tokens, on_result=None):
            return [whole for _ in requests]

    seen = []
    assert generate_until(OldBackend(), [request], 24, StopRule(first_line=True),
                          lambda i, a: seen.append(a)) == [stopped]
    assert not backends.accepts_stop(OldBackend()) and backends.accepts_stop(hf_backend)


def test_stop_rule_is_part_of_the_cache_key(tmp_path):
    class TwoLines:
        name = "two-lines"

        def __init__(self):
            self.calls = []

        def identity(self):
            return {"backend": self.name}

        def generate(self, requests, max_new_tokens, on_result=None, stop=None):
            self.calls.append([to_messages(r)[-1]["content"] for r in requests])
            answers = []
            for i, request in enumerate(requests):
                reply = f"\nanswer {to_messages(request)[-1]['content']}\nmore {max_new_tokens}"
                answers.append(reply.strip() if stop is None else stop.apply(reply))
                if on_result is not None:
                    on_result(i, answers[-1])
            return answers

    first = StopRule(first_line=True)
    inner = TwoLines()
    cached = CachedBackend(inner, ResponseCache(tmp_path))
    assert cached.generate(["a"], 8, stop=first) == ["answer a"]
    assert cached.generate(["a"], 8) == ["answer a\nmore 8"]  # a stopped answer never stands for a whole one
    assert inner.calls == [["a"], ["a"]]
    assert cached.generate(["b"], 8) == ["answer b\nmore 8"]
    assert cached.generate(["b", "a"], 8, stop=first) == ["answer b", "answer a"]  # b: its whole reply, cut
    assert cached.generate(["b"], 9, stop=first) == ["answer b"]  # another budget: asked again
    assert inner.calls == [["a"], ["a"], ["b"], ["b"]]
    assert generation_params(8) == {"max_new_tokens": 8, "decoding": "greedy"}  # keys without a rule unchanged
    assert cache_key({}, "generate", "x", generation_params(8, first)) != cache_key({}, "generate", "x",
                                                                                     generation_params(8))
    assert cache_key({}, "generate", "x", generation_params(8, first)) != cache_key(
        {}, "generate", "x", generation_params(8, StopRule(strings=("\n",))))


def _same_scores(backend, requests, max_new_tokens, stop, score):
    whole = backend.generate(requests, max_new_tokens)
    stopped = backend.generate(requests, max_new_tokens, stop=stop)
    assert [score(i, a) for i, a in enumerate(stopped)] == [score(i, a) for i, a in enumerate(whole)]
    assert stopped == [stop.apply(a) for a in whole]
    return sum(stop.cut(a) is not None for a in whole)  # replies the rule cut


@pytest.mark.slow
def test_stop_rules_leave_every_task_score_unchanged(hf_backend):
    """Each task with a stop rule, on a sample: the scores of stopped answers equal full-budget ones."""
    cut = {}
    try:
        data.mdqa_paths()
    except FileNotFoundError as exc:
        pytest.skip(f"MDQA data not available: {exc}")
    (eval_set,) = mdqa.build_eval_sets(["random"], 5, 3, question_seed=1, distractor_seed=0).values()
    keys = [(e, p) for e in eval_set.examples for p, _ in mdqa.position_prompts(e, [1, 5])]
    requests = [prompt for e in eval_set.examples for _, prompt in mdqa.position_prompts(e, [1, 5])]
    cut["mdqa"] = _same_scores(hf_backend, requests, 32, MDQA_ANSWER_END,
                               lambda i, a: score_mdqa_answer(a, keys[i][0].answers))

    def count(texts):
        return [len(ids) for ids in hf_backend.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    samples = []
    for task in ("simple", "multisubkey"):
        cfg = synthetic.GenerationConfig(task=task, num_dicts=4, max_tokens=700, seed=3)
        samples += synthetic.generate_split(cfg, "eval", 3, count)
    cut["kv"] = _same_scores(hf_backend, [s.prompt for s in samples], 48, KV_ANSWER_END,
                             lambda i, a: score_kv_answer(a, samples[i].meta))

    for name, n in (("gsm8k", 2), ("triviaqa", 4), ("nq_open", 4)):
        task = general.prepare_task(name, {"max_examples": n, "max_new_tokens": 64 if name == "gsm8k" else 32})
        spec = task.spec
        rule = general.answer_end(spec)
        assert rule is not None
        requests = [general.build_prompt(spec, item, task.shots_for(item)) for item in task.items]
        cut[name] = _same_scores(
            hf_backend, requests, task.max_new_tokens, rule,
            lambda i, a: {k: v for k, v in general.score_item(spec, task.items[i], "generate", response=a).items()
                          if k != "answer"})
    assert general.answer_end(general.TASKS["mmlu"]) is None  # a chosen letter may come anywhere
    assert sum(cut.values()) > 0, cut  # some replies did go on past where their answer ends


def test_training_precision_auto_is_fp32_on_a_cpu():
    assert resolve_precision("auto", cuda=False) == "fp32"
    assert resolve_precision("auto", cuda=True) == "bf16"
    assert resolve_precision("bf16", cuda=False) == "bf16"
    assert resolve_precision("fp32", cuda=True) == "fp32"
