"""Chat templates per model family: a system turn only where the template has one, and the answer-only loss mask
checked token by token under SmolLM2's (ChatML), a Llama-3-style and Mistral-7B-Instruct-v0.1's template."""
from __future__ import annotations

import pytest

from kvlib.engine import models, train
from kvlib.tasks import synthetic as gen

ANSWER = "The value of key 97 is 975 and it is in Dictionary [3]."
MESSAGES = [{"role": "user", "content": "Report the value of key 97 and the dictionary it is in."},
            {"role": "assistant", "content": ANSWER}]
META = {"key": 97, "value": 975, "gold_dict_name": "3"}
SYSTEM = {"role": "system", "content": gen.load_template("openai_system").strip()}

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer(embedded_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_checkpoint)


@pytest.fixture(scope="module")
def llama3_tokenizer(embedded_checkpoint):
    """SmolLM2's vocabulary with Llama 3's turn markers and template: eos (<|end_of_text|>) is not the end-of-turn
    token (<|eot_id|>), as in Llama-3 base tokenizers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def loss_tokens(tok, example) -> list[str]:
    return [tok.convert_ids_to_tokens([t])[0] for t in example["labels"] if t != train.IGNORE_INDEX]


def check_mask(tok, example, answer: str, end_token: str) -> None:
    """Token by token: every token before the answer carries no loss, the answer's tokens and the end-of-turn token
    after them carry their own id, every token after that carries none."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    labelled = [i for i, label in enumerate(labels) if label != train.IGNORE_INDEX]
    first, stop = labelled[0], labelled[-1]
    for i, (token, label) in enumerate(zip(ids, labels)):
        expected = token if first <= i <= stop else train.IGNORE_INDEX
        assert label == expected, (f"token {i} {tok.convert_ids_to_tokens([token])}: label {label}, expected "
                                   f"{expected} (loss on {first}..{stop})")
    assert tok.convert_ids_to_tokens([ids[stop]]) == [end_token]
    assert tok.decode(ids[first:stop]).strip() == answer, "the labelled tokens before end of turn are the answer"
    before = tok.decode(ids[:first])
    assert MESSAGES[0]["content"] in before and answer not in before


def test_smollm2_chatml_loss_on_answer_and_im_end_not_the_newline_after(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ex = train.tokenize_chat(tok, MESSAGES)
    check_mask(tok, ex, ANSWER, "<|im_end|>")
    assert tok.convert_ids_to_tokens(ex["input_ids"][-1:]) == ["Ċ"]  # ChatML's newline after <|im_end|> ...
    assert ex["labels"][-1] == train.IGNORE_INDEX  # ... is not part of the answer
    kinds = train._answer_token_kinds(tok, MESSAGES, META)
    assert len(kinds) == len(loss_tokens(tok, ex)) and kinds[-1] == "format"
    assert "".join(t for t, k in zip(loss_tokens(tok, ex), kinds) if k == "key").replace("Ġ", "") == "97"


def test_smollm2_keeps_a_system_turn(smollm2_tokenizer):
    messages = [SYSTEM, *MESSAGES]
    assert models.fit_to_template(smollm2_tokenizer, messages) == messages
    ex = train.tokenize_chat(smollm2_tokenizer, messages)
    assert SYSTEM["content"] in smollm2_tokenizer.decode(ex["input_ids"])
    check_mask(smollm2_tokenizer, ex, ANSWER, "<|im_end|>")


def test_llama3_style_template_ends_the_loss_at_eot_id_not_eos(llama3_tokenizer):
    tok = llama3_tokenizer
    ex = train.tokenize_chat(tok, MESSAGES)
    assert tok.convert_ids_to_tokens(ex["input_ids"][:2]) == ["<|begin_of_text|>", "<|start_header_id|>"]
    # the prompt alone ends in "\n\n" (one token); followed by the answer it splits in two: the mask follows the
    # answer's characters, not the prompt's token count
    prompt = tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(prompt) != ex["input_ids"][:len(prompt)]
    check_mask(tok, ex, ANSWER, "<|eot_id|>")
    assert loss_tokens(tok, ex)[-1] == "<|eot_id|>" and "<|end_header_id|>" not in loss_tokens(tok, ex)
    kinds = train._answer_token_kinds(tok, MESSAGES, META)
    assert kinds.count("key") >= 1 and kinds[-1] == "format"
    with_system = train.tokenize_chat(tok, [SYSTEM, *MESSAGES])  # the template has a system role
    assert "<|start_header_id|>system" in tok.decode(with_system["input_ids"], skip_special_tokens=False)


@pytest.fixture(scope="module")
def mistral_tokenizer():
    return models.hf_tokenizer_from_spm("mistral-7b-v0.1")


def test_mistral_tokenizer_is_the_sentencepiece_model(mistral_tokenizer):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(models._mistral_common_file("tokenizer.model.v1")))
    text = "Dictionary [3] {12: 345, 6789: 12}\nAbove is a list of dictionaries. Report the value of key 97."
    assert mistral_tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert len(mistral_tokenizer) == 32000
    assert (mistral_tokenizer.bos_token, mistral_tokenizer.eos_token) == ("<s>", "</s>")


def test_mistral_v01_loss_mask_leaves_out_the_space_after_eos(mistral_tokenizer):
    tok = mistral_tokenizer
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == f"<s>[INST] {MESSAGES[0]['content']} [/INST]{ANSWER}</s> "  # v0.1's template
    ex = train.tokenize_chat(tok, MESSAGES)
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    assert tokens[-2:] == ["</s>", "▁"]
    check_mask(tok, ex, ANSWER, "</s>")
    assert ex["labels"][-1] == train.IGNORE_INDEX, "the space the template writes after </s> carries no loss"
    # inside the template the answer starts without SentencePiece's word-initial space ("The", not "▁The"),
    # so the token kinds come from offsets in the rendered text
    assert loss_tokens(tok, ex)[0] == "The" and tok.convert_ids_to_tokens(tok("The")["input_ids"])[-1] == "▁The"
    kinds = train._answer_token_kinds(tok, MESSAGES, META)
    labelled = loss_tokens(tok, ex)
    assert "".join(t for t, k in zip(labelled, kinds) if k == "key").replace("▁", "") == "97"
    assert "".join(t for t, k in zip(labelled, kinds) if k == "value").replace("▁", "") == "9753"
    assert kinds[-1] == "format"


def test_mistral_v01_has_no_system_turn_the_system_text_opens_the_user_turn(mistral_tokenizer):
    """The paper's OpenAI-format data carries a system message; Mistral v0.1's template raises on one, so the
    system text goes at the start of the first user turn (training and evaluation alike)."""
    tok = mistral_tokenizer
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([SYSTEM, *MESSAGES], tokenize=False)
    fitted = models.fit_to_template(tok, [SYSTEM, *MESSAGES])
    assert [m["role"] for m in fitted] == ["user", "assistant"]
    assert fitted[0]["content"] == f"{SYSTEM['content']}\n\n{MESSAGES[0]['content']}"
    ex = train.tokenize_chat(tok, [SYSTEM, *MESSAGES])
    assert tok.decode(ex["input_ids"]).startswith(f"<s> [INST] {SYSTEM['content']}")
    check_mask(tok, ex, ANSWER, "</s>")
    with pytest.raises(Exception, match="alternate"):  # anything else the template refuses is still refused
        models.fit_to_template(tok, [SYSTEM, MESSAGES[1], MESSAGES[0]])
