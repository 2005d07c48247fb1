"""Chat models stop at their turn: the stop set (`stop_tokens.read_eos_ids`) of local look-alikes
of Llama-3.1-Instruct, Qwen2.5-Instruct, Gemma-2-it and Phi-3-mini-instruct (their special
tokens, the relevant part of their chat templates, their generation_config.json EOS lists, with
the real ids where a small vocabulary has them and the real offsets otherwise), the sampler
stopping at each one's end of turn, at the first of several stop ids, and SFT targets ending
with exactly one stop token."""
import dataclasses

import jax
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import Regex, decoders, models, pre_tokenizers

from p3o_jax import model as M
from p3o_jax import sampler as S
from p3o_jax.config import DataConfig
from p3o_jax.data import own
from p3o_jax.data.render import Render
from p3o_jax.stop_tokens import read_eos_ids
from p3o_jax.tasks import TextRLHF
from tests.test_sampler import left_padded_prompts, random_params

CHARS = ["\n", *map(chr, range(32, 127))]       # one token per character


@dataclasses.dataclass(frozen=True)
class Family:
    tokens: list            # the vocabulary in id order
    roles: dict             # bos_token, eos_token, ... (strings)
    template: str           # Jinja, equivalent to the model's for a user and an assistant turn
    generation_eos: list    # generation_config.json's eos_token_id
    eos_ids: tuple          # the expected stop set, the primary (tokenizer EOS) first
    end_of_turn: int        # what an assistant turn ends with


FAMILIES = {
    # 128000 + i -> 96 + i; the 3.1 tokenizer's EOS is <|eot_id|>
    "llama3": Family(
        [*CHARS, "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
         "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
         "<|eot_id|>"],
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}",
        [97, 104, 105], (105, 97, 104), 105),
    # 151643 + i -> 96 + i
    "qwen2.5": Family(
        [*CHARS, "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        [98, 96], (98, 96), 98),
    # the real ids: <eos> 1, <end_of_turn> 107
    "gemma2": Family(
        ["<pad>", "<eos>", "<bos>", "<unk>", *[f"<unused{i}>" for i in range(102)],
         "<start_of_turn>", "<end_of_turn>", *CHARS],
        dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"),
        "{{ bos_token }}{% for m in messages %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        [1, 107], (1, 107), 107),
    # 32000 + i -> 99 + i; the template ends a whole conversation with the EOS
    "phi3": Family(
        ["<unk>", "<s>", "</s>", *CHARS, "<|endoftext|>", "<|assistant|>", "<|placeholder1|>",
         "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
         "<|placeholder5|>", "<|placeholder6|>", "<|user|>"],
        dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
             unk_token="<unk>"),
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
        "'<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
        [99, 100, 106], (99, 106, 100), 106),
}


def tokenizer_of(f: Family) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer with `f`'s vocabulary, special tokens and chat template."""
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(f.tokens)},
                                                unk_token=f.roles.get("unk_token", "<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in f.tokens
                            if t not in CHARS])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **f.roles)
    fast.chat_template = f.template
    return fast


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's local model folder: tokenizer files and generation_config.json."""
    out = {}
    for name, f in FAMILIES.items():
        path = str(tmp_path_factory.mktemp(name))
        tokenizer_of(f).save_pretrained(path)
        transformers.GenerationConfig(eos_token_id=f.generation_eos).save_pretrained(path)
        out[name] = path
    return out


def test_stop_set_of_each_family(folders):
    for name, path in folders.items():
        f = FAMILIES[name]
        task = TextRLHF.__new__(TextRLHF)     # what every text task reads from its tokenizer
        task.read_tokenizer(path, DataConfig(), model=path)
        assert task.eos_ids == f.eos_ids, name
        assert task.eos_id == task.eos_ids[0] == task.tokenizer.eos_token_id, name
        # without a model folder: the tokenizer's EOS and the template's end of turn
        assert read_eos_ids(task.tokenizer, "") == tuple(dict.fromkeys(
            (f.eos_ids[0], f.end_of_turn))), name
    plain = tokenizer_of(FAMILIES["qwen2.5"])
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    assert read_eos_ids(plain, "") == (FAMILIES["qwen2.5"].eos_ids[0],)


def test_sft_targets_end_with_exactly_one_stop_token():
    """The template's end of turn where it writes one (Gemma, Phi-3: not followed by the EOS),
    the EOS appended where the EOS is the end of turn (Llama-3.1, Qwen2.5)."""
    for name, f in FAMILIES.items():
        tok = tokenizer_of(f)
        records = own.Records("sft", [[{"role": "user", "content": "What is 2 + 2?"}]],
                              {"response": [[{"role": "assistant", "content": "4"}]]}, {},
                              ["row 0"], name)
        render = Render(tok)
        columns = own.encode(records, render, 64, 16, "truncate")
        response = columns["response.ids"].tolist()
        assert response == tok.encode("4", add_special_tokens=False) + [f.end_of_turn], name


# One tiny model for every family (a vocabulary that holds all their ids) and one stop set, the
# union of theirs (each id is one family's only): all greedy runs are one compiled program.
MODEL = M.ModelConfig(family="llama", vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2)
P, N = 32, 10


def test_greedy_decoding_stops_at_each_family_end_of_turn(folders):
    """Each family's prompt, its end of turn `eot` from its folder's stop set. With the model's
    LM-head columns of `eot` and of a token `a` that greedy decoding first emits at step k
    swapped, it emits `eot` at step k instead, where the response ends (kept, mask 1), after
    the same tokens."""
    params = random_params(MODEL, seed=1, scale=1.0)
    toks = {name: transformers.AutoTokenizer.from_pretrained(path)
            for name, path in folders.items()}
    stops = {name: read_eos_ids(tok, folders[name]) for name, tok in toks.items()}
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                  add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for tok in toks.values()]
    ids = np.array([[0] * (P - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (P - len(p)) + [1] * len(p) for p in prompts], np.int32)
    keys = jax.random.split(jax.random.key(0), len(prompts))
    union = tuple(dict.fromkeys(i for s in stops.values() for i in s))
    scfg = S.SamplingConfig(max_new_tokens=N, greedy=True, eos_ids=union)
    before = np.asarray(S.generate(params, MODEL, scfg, ids, mask, keys).tokens)
    head = params["lm_head"]
    for b, (name, f) in enumerate(FAMILIES.items()):
        row = before[b].tolist()
        k = next(t for t in range(2 + b, N) if row[t] not in row[:t] + list(union))
        a, eot = row[k], f.end_of_turn
        assert eot in stops[name] and not set(row[:k]) & set(union), (name, row)
        swapped = dict(params, lm_head=head.at[:, [a, eot]].set(head[:, [eot, a]]))
        out = S.generate(swapped, MODEL, scfg, ids, mask, keys)
        np.testing.assert_array_equal(out.tokens[b], row[:k] + [eot] + [0] * (N - k - 1), name)
        np.testing.assert_array_equal(out.mask[b], [1] * (k + 1) + [0] * (N - k - 1), name)


def test_sampling_stops_at_the_first_of_several_stop_ids():
    """Against a run without stops, with the same keys: each row is its prefix through the
    first token that is any of the stop ids, then padding."""
    params = random_params(MODEL, seed=2)
    B = 4
    prompts, prompt_mask = left_padded_prompts(B, P, MODEL.vocab_size, [P, 5, 9, 20], seed=4)
    keys = jax.random.split(jax.random.key(7), B)
    plain = S.SamplingConfig(max_new_tokens=N, temperature=1.0)
    free = S.generate(params, MODEL, plain, prompts, prompt_mask, keys)
    rows = np.asarray(free.tokens).tolist()
    never = min(set(range(MODEL.vocab_size)) - {t for row in rows for t in row})
    eos_ids = (rows[0][6], rows[1][2], never, rows[2][8])      # one is never sampled
    out = S.generate(params, MODEL, dataclasses.replace(plain, eos_ids=eos_ids), prompts,
                     prompt_mask, keys)
    lengths = [next((t + 1 for t, x in enumerate(row) if x in eos_ids), N) for row in rows]
    assert len(set(lengths)) >= 3, lengths                        # rows stop at different steps
    live = np.arange(N)[None] < np.array(lengths)[:, None]
    np.testing.assert_array_equal(out.mask, live.astype(np.int32))
    np.testing.assert_array_equal(out.tokens, np.where(live, rows, 0))
    np.testing.assert_allclose(out.raw_logprobs, np.where(live, free.raw_logprobs, 0), atol=1e-6)
    assert int(out.num_steps) == max(lengths)
