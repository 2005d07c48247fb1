"""Your own data as text and token ids (p3o_jax/data/render.py, `own.encode`): a response's ids
are what the sampler emits after its prompt (a SentencePiece tokenizer included), templates
whose generation prompt the rendered turn lacks (DeepSeek-R1-distill's `<think>\\n`), exactly
one stop token per target, `chat_template_kwargs`, over-long prompts (stop, cut the content with
the template kept, drop), and the one tokenised-data cache keyed by the code."""
import numpy as np
import pytest

from p3o_jax.data import cache, own, prompts
from p3o_jax.data.fixtures import chat_tokenizer, sentencepiece_tokenizer
from p3o_jax.data.render import Render
from p3o_jax.data.validate import UpstreamError

# DeepSeek-R1-distill's template, its parts that matter here: the generation prompt adds
# "<think>\n", and an assistant turn is rendered without the reasoning before "</think>".
R1 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
      "{{ '<｜User｜>' + m['content'] }}{% else %}{% set c = m['content'] %}"
      "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
      "{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
# Qwen3's switch: with enable_thinking=false the generation prompt holds an empty reasoning
QWEN3 = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
         "{% if m['role'] == 'assistant' %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
         "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and "
         "enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}")


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def records(prompt_values, responses, kind="sft"):
    return own.Records(kind, list(prompt_values), {"response": list(responses)} if responses
                       else {}, {}, [f"data.jsonl row {i}" for i in range(len(prompt_values))],
                       f"{kind}-{len(prompt_values)}")


def ids_of(columns, field, i):
    o = columns[f"{field}.offsets"]
    return columns[f"{field}.ids"][o[i]:o[i + 1]].tolist()


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def r1(sp):
    tok = sentencepiece_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>",
                                                          "<｜end▁of▁sentence｜>"]})
    tok.chat_template = R1
    return tok


QUESTIONS = [(f"What is {a} + {b}?", f"#### {a + b}") for a, b in [(3, 4), (9, 9), (0, 1)]]


@pytest.mark.parametrize("make", [sentencepiece_tokenizer, chat_tokenizer])
@pytest.mark.parametrize("wrap", [True, False])
def test_a_target_is_what_the_sampler_emits_after_its_prompt(make, wrap):
    """The prompt's ids are its rendered text's; the response's are those that follow them in
    the encoding of prompt + response, one text: what the policy samples after the prompt."""
    tok = make()
    render = Render(tok, wrap=wrap)
    values = [q if wrap else f"Q: {q} A:" for q, _ in QUESTIONS]
    answers = [a if wrap else " " + a for _, a in QUESTIONS]
    columns = own.encode(records(values, answers), render, 40, 12, "error")
    for i, (value, answer) in enumerate(zip(values, answers)):
        text = render.prompt(value)
        target = render.response(value, answer)
        whole = prompts.encode(tok, text + target)
        assert ids_of(columns, "prompt", i) == prompts.encode(tok, text)
        assert ids_of(columns, "prompt", i) + ids_of(columns, "response", i) == whole
        assert tok.decode(whole) == text + target
        stop = "<|im_end|>" if wrap else tok.eos_token
        assert target == answer + stop and ids_of(columns, "response", i)[-1] == \
            tok.convert_tokens_to_ids(stop)


def test_sentencepiece_responses_differ_from_their_text_alone(sp):
    """What the issue was: "#### 7" encoded alone starts with "▁####", which the policy never
    samples after "<|im_start|>assistant\\n"; the target is "##", "##", "▁7", <|im_end|>."""
    render = Render(sp)
    columns = own.encode(records([user("What is 3 + 4?")], [assistant("#### 7")]), render, 40, 12,
                         "error")
    target = ids_of(columns, "response", 0)
    assert target != prompts.encode(sp, "#### 7<|im_end|>")
    assert sp.convert_ids_to_tokens(target) == ["##", "##", "▁7", "<|im_end|>"]


def test_r1_distill_template_reasoning_is_kept_after_the_think_prompt(r1):
    """The prompt is what the sampler sees (ending in "<think>\\n"); the target is the content
    as written, less the "<think>\\n" the prompt already holds, then the end of turn, though
    the template's own rendering of the turn drops the reasoning."""
    render = Render(r1)
    prompt = user("What is 3 + 4?")
    text = render.prompt(prompt)
    assert text == "<s><｜User｜>What is 3 + 4?<｜Assistant｜><think>\n"
    reasoned = "<think>\n3 and 4 make 7.\n</think>\n\n#### 7"
    assert render.response(prompt, reasoned) == "3 and 4 make 7.\n</think>\n\n#### 7<｜end▁of▁sentence｜>"
    assert render.response(prompt, "#### 7") == "#### 7<｜end▁of▁sentence｜>"
    columns = own.encode(records([prompt, prompt], [assistant(reasoned), assistant("#### 7")]),
                         render, 40, 40, "error")
    for i, content in enumerate([reasoned, "#### 7"]):
        whole = prompts.encode(r1, text + render.response(prompt, content))
        assert ids_of(columns, "prompt", i) + ids_of(columns, "response", i) == whole
        assert ids_of(columns, "response", i).count(r1.convert_tokens_to_ids(
            "<｜end▁of▁sentence｜>")) == 1


def test_a_template_that_changes_the_text_before_the_response_is_one_error(sp):
    tok = sentencepiece_tokenizer()
    tok.chat_template = ("{% if add_generation_prompt %}{{ 'GEN ' }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '> ' }}{% endif %}")
    with pytest.raises(UpstreamError, match=r"data.jsonl row 0: the chat template renders the "
                                            r"text before the response differently"):
        own.encode(records([user("hi")], ["hello"]), Render(tok), 40, 8, "error")


def test_exactly_one_stop_token(sp):
    """The template's end of turn when it renders one (not also the EOS), else the EOS; a
    plain completion that ends with the EOS does not get a second."""
    chatml = Render(sp)          # EOS </s>, ChatML ends a turn with <|im_end|>
    assert chatml.response(user("hi"), "hello") == "hello<|im_end|>"
    bare = sentencepiece_tokenizer()
    bare.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    assert Render(bare).response(user("hi"), "hello") == "hello</s>"
    assert chatml.response("2 + 2 =", " 4") == " 4</s>"
    assert chatml.response("2 + 2 =", " 4</s>") == " 4</s>"


def test_chat_template_kwargs_reach_every_template_call(sp):
    tok = sentencepiece_tokenizer()
    tok.chat_template = QWEN3
    thinking, quiet = Render(tok), Render(tok, template_kwargs={"enable_thinking": False})
    prompt = user("What is 3 + 4?")
    assert quiet.prompt(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert thinking.prompt(prompt).endswith("<|im_start|>assistant\n")
    assert quiet.response(prompt, "#### 7") == "#### 7<|im_end|>"
    assert thinking.response(prompt, "#### 7") == "<think>\n\n</think>\n\n#### 7<|im_end|>"
    assert quiet.fingerprint() != thinking.fingerprint()


LONG = "Tell me, after this long preamble about numbers and sums, " * 3 + "what is 3 + 4?"


def test_long_prompts_stop_the_run_naming_the_row(sp):
    r = records([user("What is 3 + 4?"), user(LONG), user(LONG)], None, kind="prompt")
    n = len(prompts.encode(sp, Render(sp).prompt(user(LONG))))
    with pytest.raises(UpstreamError, match=rf"data.jsonl row 1: the prompt is {n} tokens, more "
                                            rf"than data.prompt_len=30 \(and 1 more of the 3\)"):
        own.encode(r, Render(sp), 30, 8, "error")


@pytest.mark.parametrize("make", [sentencepiece_tokenizer, chat_tokenizer])
def test_truncate_cuts_the_last_user_message_and_keeps_the_template(make, capsys):
    tok = make()
    render = Render(tok)
    system = [{"role": "system", "content": "You add numbers."}]
    value = system + user(LONG)
    budget = 40
    columns = own.encode(records([value], [assistant("#### 7")]), render, budget, 8, "truncate")
    assert "1 of 1 prompts (sft rows) are longer than 40 tokens: their last user message cut " \
        "to fit (data.long_prompts=truncate)" in capsys.readouterr().err
    ids = ids_of(columns, "prompt", 0)
    text = tok.decode(ids)
    assert len(ids) <= budget
    head = "<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n"
    assert text.startswith(head) and text.endswith("3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    kept = text[len(head):].split("<|im_end|>")[0]
    assert LONG.endswith(kept) and len(kept) < len(LONG)
    longer = system + user(LONG[-len(kept) - 1:])       # one more character does not fit
    assert len(prompts.encode(tok, render.prompt(longer))) > budget
    fitted = render.fit(value, budget)
    assert ids_of(columns, "response", 0) == prompts.encode_responses(
        tok, [render.prompt(fitted)], [ids], [render.response(fitted, assistant("#### 7"))])[0]


def test_truncate_of_a_plain_prompt_and_a_template_longer_than_the_budget(sp):
    render = Render(sp)
    columns = own.encode(records([LONG], None, kind="prompt"), render, 12, 8, "truncate")
    ids = ids_of(columns, "prompt", 0)
    assert len(ids) <= 12 and LONG.endswith(sp.decode(ids).strip())
    system = [{"role": "system", "content": LONG}]
    with pytest.raises(UpstreamError, match=r"data.jsonl row 0: the prompt is over "
                                            r"data.prompt_len=20 tokens even with its last user "
                                            r"message empty"):
        own.encode(records([system + user("hi")], None, kind="prompt"), render, 20, 8, "truncate")


def test_filter_drops_the_long_prompts(sp, capsys):
    r = records([user("What is 3 + 4?"), user(LONG), user("What is 9 + 9?")],
                [assistant("#### 7"), assistant("#### 7"), assistant("#### 18")])
    columns = own.encode(r, Render(sp), 30, 8, "filter")
    assert columns["row"].tolist() == [0, 2]
    assert "1 of 3 prompts (sft rows) are longer than 30 tokens: dropped" in capsys.readouterr().err


def test_the_cache_key_holds_the_code(tmp_path):
    """An entry is reused while the key and the code are the same; other code is another
    entry, with no version number to bump."""
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3)}

    def one(): return 1

    def two(): return 2
    first = cache.cached(tmp_path, "t", "key", (one,), compute)
    again = cache.cached(tmp_path, "t", "key", (one,), compute)
    np.testing.assert_array_equal(first["x"], again["x"])
    assert len(calls) == 1
    cache.cached(tmp_path, "t", "key", (two,), compute)
    cache.cached(tmp_path, "t", "other", (one,), compute)
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3
    assert cache.cached(None, "t", "key", (one,), compute)["x"].tolist() == [0, 1, 2]
