"""Tests of the offline toy task: data layout, gold reward, tokenizer, annotator."""
import dataclasses

import numpy as np
import pytest
from transformers import AutoTokenizer

from p3o_jax.toy_task import (BOS_ID, EOS_ID, MISTAKES, PAD_ID, SEP_ID, SPLITS, ToyTask,
                              ToyTaskConfig, annotate_preferences)

CFG = ToyTaskConfig()
TASK = ToyTask(CFG)
P, R = CFG.prompt_len, CFG.response_len
# A second weighting, so that each documented amount is checked with unequal weights.
ODD = ToyTaskConfig(kw_reward=2.0, foreign_penalty=0.7, eos_bonus=0.3, length_penalty=0.25)


def reference_gold(task, prompt, response):
    """Loop-by-loop transcription of the module docstring's formula, for one example."""
    c = task.config
    post_kws = {t for t in prompt if 0 <= t < task.vocab_size and task.is_keyword[t]}
    content = []
    has_eos = False
    for t in response:
        if t == EOS_ID:
            has_eos = True
            break
        content.append(t)
    hits, seen = 0, set()
    for t in content:
        hits += t in post_kws and t not in seen
        seen.add(t)
    bad = len(content) - hits
    return (c.kw_reward * hits - c.foreign_penalty * bad + c.eos_bonus * has_eos
            - c.length_penalty * max(0, len(content) - len(post_kws)))


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_data_and_streams_are_prefix_consistent():
    a, b = ToyTask(CFG), ToyTask(ToyTaskConfig())
    for split in SPLITS:
        np.testing.assert_array_equal(a.prompts(50, split)[0], b.prompts(50, split)[0])
    sa, sb = a.sft_batch(100), b.sft_batch(100)
    for f in dataclasses.fields(sa):
        np.testing.assert_array_equal(getattr(sa, f.name), getattr(sb, f.name))
    # Item i depends only on (seed, split, i): a window equals the slice of a longer call.
    np.testing.assert_array_equal(a.prompts(10, "rl", start=5)[0], a.prompts(15, "rl")[0][5:])
    np.testing.assert_array_equal(a.sft_batch(10, start=5).input_ids, sa.input_ids[5:15])
    other = ToyTask(ToyTaskConfig(seed=1))
    assert other.vocab == a.vocab  # the vocabulary does not depend on the seed
    assert not np.array_equal(other.prompts(50)[0], a.prompts(50)[0])


def test_eval_stream_disjoint_from_training_streams():
    ev = {tuple(r) for r in TASK.eval_prompts(2000)[0]}
    assert len(ev) == 2000
    for split in ("sft", "rm", "rl"):
        train = {tuple(r) for r in TASK.prompts(2000, split)[0]}
        assert not ev & train, split


# ---------------------------------------------------------------------------- layouts
def test_vocabulary_and_special_ids():
    assert (PAD_ID, EOS_ID, BOS_ID, SEP_ID) == (0, 1, 2, 3)
    assert TASK.vocab[:4] == ["<pad>", "<eos>", "<bos>", "tldr"]
    assert TASK.vocab_size == 4 + CFG.n_topics * CFG.keywords_per_topic + CFG.n_filler == 132
    assert len(set(TASK.vocab)) == TASK.vocab_size


def test_prompts_left_padded_with_one_topic_keywords():
    ids, mask = TASK.prompts(500)
    assert ids.shape == mask.shape == (500, P) and ids.dtype == mask.dtype == np.int32
    assert np.all(np.diff(mask, axis=1) >= 0)  # left padding: mask is 0...0 1...1
    assert np.all(ids[mask == 0] == PAD_ID) and np.all(ids[mask == 1] != PAD_ID)
    lengths = mask.sum(1)
    assert lengths.min() >= CFG.post_len_min + 2 and lengths.max() <= CFG.post_len_max + 2
    assert np.all(ids[np.arange(500), P - lengths] == BOS_ID) and np.all(ids[:, -1] == SEP_ID)
    for row, m in zip(ids, mask):
        kws = row[(m == 1) & TASK.is_keyword[row]]
        assert CFG.keywords_per_post_min <= len(kws) <= CFG.keywords_per_post_max
        assert len(set(kws.tolist())) == len(kws)
        assert len({(k - TASK.keyword_start) // CFG.keywords_per_topic for k in kws}) == 1


def test_sft_batch_layout():
    n = 2000
    b = TASK.sft_batch(n)
    for arr in (b.input_ids, b.attention_mask, b.loss_mask):
        assert arr.shape == (n, P + R) and arr.dtype == np.int32
    assert b.gold.shape == (n,) and b.gold.dtype == np.float32 and b.noisy.dtype == bool
    p_ids, p_mask = TASK.prompts(n, "sft")
    np.testing.assert_array_equal(b.input_ids[:, :P], p_ids)
    np.testing.assert_array_equal(b.attention_mask[:, :P], p_mask)
    assert np.all(b.loss_mask[:, :P] == 0)
    r_ids, r_mask = b.input_ids[:, P:], b.attention_mask[:, P:]
    np.testing.assert_array_equal(b.loss_mask[:, P:], r_mask)
    assert np.all(np.diff(r_mask, axis=1) <= 0)  # right padding: mask is 1...1 0...0
    assert np.all(r_ids[r_mask == 0] == PAD_ID) and np.all(r_mask.sum(1) >= 1)
    last = r_ids[np.arange(n), r_mask.sum(1) - 1]
    has_eos = (r_ids == EOS_ID).any(1)
    assert np.all(last[has_eos] == EOS_ID)  # the EOS, when present, is the last loss token
    assert np.all(r_mask[~has_eos].sum(1) == R)  # without EOS the demo runs to response_len
    # Clean demos are the oracle summaries; the noisy fraction is Binomial(n, demo_noise).
    perfect_ids, perfect_mask = TASK.perfect_summaries(p_ids, p_mask)
    np.testing.assert_array_equal(r_ids[~b.noisy], perfect_ids[~b.noisy])
    np.testing.assert_array_equal(r_mask[~b.noisy], perfect_mask[~b.noisy])
    sigma = np.sqrt(CFG.demo_noise * (1 - CFG.demo_noise) / n)
    assert abs(b.noisy.mean() - CFG.demo_noise) < 4 * sigma
    np.testing.assert_array_equal(b.gold, TASK.gold_reward(p_ids, p_mask, r_ids, r_mask))


# ---------------------------------------------------------------------------- gold reward
@pytest.mark.parametrize("cfg", [CFG, ODD], ids=["default", "odd_weights"])
def test_gold_reward_formula_by_hand(cfg):
    task = ToyTask(cfg)
    c = cfg
    post = "<bos> w0 t0k1 w3 t0k2 w5 w5 t0k3 tldr"  # K = 3 keywords of topic 0

    def g(summary):
        return task.gold_reward_text(post, summary)

    perfect = 3 * c.kw_reward + c.eos_bonus
    extra = c.foreign_penalty + c.length_penalty  # cost of one added wrong word
    assert g("t0k1 t0k2 t0k3 <eos>") == pytest.approx(perfect)
    assert g("t0k3 t0k1 t0k2 <eos>") == pytest.approx(perfect)  # order is free
    assert g("t0k1 t0k2 t0k3 <eos> w1 t9k9 <pad>") == pytest.approx(perfect)  # after EOS: ignored
    assert g("t0k1 t0k3 <eos>") == pytest.approx(perfect - c.kw_reward)  # missing keyword
    assert g("t0k1 w7 t0k2 t0k3 <eos>") == pytest.approx(perfect - extra)  # filler
    assert g("t0k1 t1k0 t0k2 t0k3 <eos>") == pytest.approx(perfect - extra)  # other topic
    assert g("t0k1 t0k4 t0k2 t0k3 <eos>") == pytest.approx(perfect - extra)  # same topic, absent
    assert g("t0k1 t0k2 t0k1 t0k3 <eos>") == pytest.approx(perfect - extra)  # repeat
    assert g("t0k1 t0k2 t0k3 w5 w5 w1 <eos>") == pytest.approx(perfect - 3 * extra)  # too long
    assert g("t0k1 t0k2 t0k3") == pytest.approx(perfect - c.eos_bonus)  # missing EOS
    assert g("t0k1 tldr t0k2 t0k3 <eos>") == pytest.approx(perfect - extra)  # special word
    assert g("<eos>") == pytest.approx(c.eos_bonus)
    # A missing keyword and a filler word in its place: the length penalty does not apply.
    assert g("t0k1 w7 t0k3 <eos>") == pytest.approx(perfect - c.kw_reward - c.foreign_penalty)
    # Masked-out tokens and out-of-vocabulary ids.
    p_ids = np.array([[task.word_to_id[w] for w in post.split()]])
    r_ids = np.array([[task.word_to_id[w] for w in "t0k1 w7 t0k2 t0k3 <eos>".split()]])
    p_mask = np.ones_like(p_ids)
    masked = task.gold_reward(p_ids, p_mask, r_ids, np.array([[1, 0, 1, 1, 1]]))
    assert masked[0] == pytest.approx(perfect)
    r_ids[0, 1] = 10_000
    assert task.gold_reward(p_ids, p_mask, r_ids)[0] == pytest.approx(perfect - extra)


@pytest.mark.parametrize("cfg", [CFG, ODD], ids=["default", "odd_weights"])
def test_vectorised_gold_matches_reference_loop(cfg):
    task = ToyTask(cfg)
    b = task.sft_batch(300)
    p_ids, p_mask = b.input_ids[:, :P], b.attention_mask[:, :P]
    rng = np.random.default_rng(0)
    # Random ids over a padded vocabulary (beyond vocab_size), biased towards EOS and keywords.
    rand = rng.integers(0, task.vocab_size + 8, size=(300, R))
    rand[rng.random((300, R)) < 0.1] = EOS_ID
    kw = p_ids[np.arange(300)[:, None], rng.integers(0, P, (300, R))]
    rand = np.where(rng.random((300, R)) < 0.3, kw, rand)
    for r_ids, r_mask in [(b.input_ids[:, P:], b.attention_mask[:, P:]), (rand, None)]:
        got = task.gold_reward(p_ids, p_mask, r_ids, r_mask)
        mask = np.ones_like(r_ids) if r_mask is None else r_mask
        want = [reference_gold(task, p[m == 1].tolist(), r[rm == 1].tolist())
                for p, m, r, rm in zip(p_ids, p_mask, r_ids, mask)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_reward_levels_perfect_demos_random():
    b = TASK.sft_batch(3000)
    p_ids, p_mask = b.input_ids[:, :P], b.attention_mask[:, :P]
    perfect = TASK.gold_reward(p_ids, p_mask, *TASK.perfect_summaries(p_ids, p_mask))
    n_kw = (TASK.is_keyword[p_ids] & (p_mask == 1)).sum(1)
    np.testing.assert_allclose(perfect, n_kw * CFG.kw_reward + CFG.eos_bonus)
    random = TASK.gold_reward(p_ids, p_mask,
                              np.random.default_rng(0).integers(0, TASK.vocab_size, (3000, R)))
    assert np.all(b.gold <= perfect) and np.all(random <= perfect)
    assert np.all(b.gold[~b.noisy] == perfect[~b.noisy])
    assert np.all(b.gold[b.noisy] < perfect[b.noisy])
    assert perfect.mean() > b.gold.mean() + 2.0  # clear headroom above the demos (3.5 vs ~0.9)
    assert random.mean() < -10.0  # a uniform random-token policy is far below (~ -12.7)


def test_every_mistake_kind_occurs():
    b = TASK.sft_batch(2000)
    seen = set()
    for prompt, resp, m in zip(b.input_ids[:, :P], b.input_ids[:, P:], b.attention_mask[:, P:]):
        resp = resp[m == 1].tolist()
        post_kws = {t for t in prompt.tolist() if TASK.is_keyword[t]}
        words = resp[:-1] if resp[-1] == EOS_ID else resp
        kws = [t for t in words if TASK.is_keyword[t]]
        seen |= {"drop"} if not post_kws <= set(words) else set()
        seen |= {"filler"} if any(t >= TASK.filler_start for t in words) else set()
        seen |= {"foreign"} if set(kws) - post_kws else set()
        seen |= {"repeat"} if len(set(kws)) < len(kws) else set()
        seen |= {"long"} if resp[-1] == EOS_ID and len(words) > len(post_kws) + 1 else set()
        seen |= {"no_eos"} if resp[-1] != EOS_ID else set()
    assert seen == set(MISTAKES)


def test_format_samples_and_decode():
    b = TASK.sft_batch(3)
    out = TASK.format_samples(b.input_ids[:, :P], b.attention_mask[:, :P],
                              b.input_ids[:, P:], b.attention_mask[:, P:])
    assert out.count("post: <bos>") == 3 and out.count("gold:") == 3
    assert TASK.decode(np.array([[PAD_ID, 4, EOS_ID, 999]])) == ["t0k0 <eos> <999>"]


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_determinism_and_save(tmp_path):
    tok = TASK.tokenizer(save_dir=tmp_path)
    assert tok.get_vocab() == TASK.word_to_id
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    assert tok.unk_token_id == BOS_ID and tok.padding_side == "left"
    assert tok.convert_ids_to_tokens(list(range(TASK.vocab_size))) == TASK.vocab
    assert tok("no_such_word t0k0")["input_ids"] == [BOS_ID, 4]
    b = TASK.sft_batch(50)
    for ids, mask, text in zip(b.input_ids, b.attention_mask,
                               TASK.decode(b.input_ids, b.attention_mask)):
        assert tok.decode(ids[mask == 1].tolist()) == text
        assert tok(text)["input_ids"] == ids[mask == 1].tolist()
    assert TASK.tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == TASK.word_to_id and loaded.padding_side == "left"
    special = (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id)
    assert special == (PAD_ID, EOS_ID, BOS_ID)
    prompts = TASK.decode(*TASK.prompts(4))
    batch = loaded(prompts, padding="max_length", max_length=P, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], TASK.prompts(4)[0])
    np.testing.assert_array_equal(batch["attention_mask"], TASK.prompts(4)[1])


# ---------------------------------------------------------------------------- annotator
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_annotator_matches_bradley_terry(temperature):
    # Each label is Bernoulli(p), so the frequency over n pairs has std sqrt(p (1 - p) / n).
    # A 4-sigma band has a two-sided false-alarm probability of ~6e-5 per gap (and the rng is
    # seeded, so the test is deterministic), while a wrong temperature (e.g. 2x) or a flipped
    # sign would miss the band by tens of sigma at n = 20000.
    n = 20_000
    rng = np.random.default_rng(123)
    for gap in (-3.0, -1.0, -0.3, 0.0, 0.5, 2.0):
        gold_b = rng.normal(size=n).astype(np.float32)  # the shift cancels in the difference
        labels = annotate_preferences(gold_b + gap, gold_b, rng, temperature)
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert set(np.unique(labels).tolist()) <= {0, 1}
        p = 1.0 / (1.0 + np.exp(-gap / temperature))
        assert abs(labels.mean() - p) <= 4 * np.sqrt(p * (1 - p) / n), gap


def test_annotator_noiseless_and_deterministic():
    a, b = np.array([1.0, 0.0, 2.0] * 1000), np.array([0.0, 1.0, 2.0] * 1000)
    labels = annotate_preferences(a, b, np.random.default_rng(0), temperature=0.0)
    assert np.all(labels[0::3] == 1) and np.all(labels[1::3] == 0)
    assert abs(labels[2::3].mean() - 0.5) <= 4 * np.sqrt(0.25 / 1000)  # ties: fair coin
    x = annotate_preferences(a, b, np.random.default_rng(7))
    np.testing.assert_array_equal(x, annotate_preferences(a, b, np.random.default_rng(7)))
    with pytest.raises(ValueError):
        annotate_preferences(a, b, np.random.default_rng(0), temperature=-1.0)


def test_config_validation():
    with pytest.raises(ValueError):
        ToyTaskConfig(prompt_len=CFG.post_len_max + 1)
    with pytest.raises(ValueError):
        ToyTaskConfig(response_len=CFG.keywords_per_post_max)
    with pytest.raises(ValueError):
        ToyTaskConfig(demo_noise=1.5)
    with pytest.raises(ValueError):
        ToyTaskConfig(keywords_per_post_min=4, keywords_per_post_max=3)
