"""TFDS builders, validation, prompt formatting and grain pipelines on tiny upstream-format
files (tests/data_fixtures.py); nothing is downloaded."""
import gzip
import json
import pickle
import re

import grain
import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
import tokenizers
import transformers

import data_fixtures as F
from p3o_jax import data
from p3o_jax.data import builders, prompts, validate

tfds.disable_progress_bar()

HH = "hh_rlhf/helpful-base"
NO_SHARDING = grain.sharding.NoSharding()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """All three datasets built from manual_dir into one data_dir."""
    root = tmp_path_factory.mktemp("tfds")
    F.write_tldr_sft(root / "manual_sft")
    F.write_tldr_comparisons(root / "manual_cmp")
    F.write_hh(root / "manual_hh")
    for name, manual in (("tldr_sft", "manual_sft"), ("tldr_comparisons", "manual_cmp"),
                         (HH, "manual_hh")):
        data.prepare(name, root / "data", manual_dir=root / manual)
    return root / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return F.tiny_tokenizer()


def decoded(source):
    """All records of a data source, text as str."""
    return [{k: v.decode() if isinstance(v, bytes) else int(v) for k, v in r.items()}
            for r in source]


def by_key(records, *keys):
    return sorted(records, key=lambda r: tuple(r[k] for k in keys))


# --------------------------------------------------------------------------- builders


def test_tldr_sft_roundtrip(data_dir):
    sources = tfds.data_source("tldr_sft", data_dir=data_dir)
    assert set(sources) == {"train", "valid", "test"}
    for split, records in F.TLDR_POSTS.items():
        assert by_key(decoded(sources[split]), "id") == by_key(records, "id")


def test_tldr_comparisons_roundtrip(data_dir):
    expected = {"train": [], "valid1": [], "valid2": []}
    for name, records in F.COMPARISONS.items():
        for r in records:
            info = r["info"]
            if "post" not in info:  # CNN/DM article: dropped
                continue
            s0, s1 = r["summaries"]
            expected[r["split"]].append(dict(
                id=info["id"], subreddit=info["subreddit"], title=info["title"],
                post=info["post"], summary_0=s0["text"], summary_1=s1["text"],
                policy_0=s0["policy"], policy_1=s1["policy"], note_0=s0["note"] or "",
                note_1=s1["note"] or "", choice=r["choice"], worker=r["worker"],
                batch=r["batch"], extra=json.dumps(r["extra"], sort_keys=True)))
    sources = tfds.data_source("tldr_comparisons", data_dir=data_dir)
    assert set(sources) == set(expected)
    for split, records in expected.items():
        assert records, split
        assert by_key(decoded(sources[split]), "id", "batch") == by_key(records, "id", "batch")


def test_hh_roundtrip(data_dir):
    assert [c.name for c in builders.HhRlhf.BUILDER_CONFIGS] == list(builders.HH_SUBSETS)
    sources = tfds.data_source(HH, data_dir=data_dir)
    assert set(sources) == {"train", "test"}
    for split, pairs in F.HH_DIALOGUES.items():
        got = decoded(sources[split])
        for r in got:
            assert r["prompt"].endswith("\n\nAssistant:")
        assert sorted((r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]) for r in got) \
            == sorted(pairs)


HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/"


def test_without_manual_dir_every_file_is_downloaded(tmp_path, monkeypatch):
    upstream = tmp_path / "upstream"
    F.write_hh(upstream)
    requested = {}

    def fake_download(self, urls):
        requested.update(urls)
        return {name: upstream / name for name in urls}

    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    builder = data.prepare(HH, tmp_path / "data")
    assert requested == {f"helpful-base/{s}.jsonl.gz": f"{HH_URL}helpful-base/{s}.jsonl.gz"
                         for s in ("train", "test")}
    assert builder.info.splits["train"].num_examples == len(F.HH_DIALOGUES["train"])


def test_failed_download_names_file_and_url(tmp_path, monkeypatch):
    def no_network(self, urls):
        raise requests.ConnectionError("HTTPSConnectionPool(host='huggingface.co', port=443):"
                                       " Max retries exceeded\nsecond line")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_network)
    with pytest.raises(data.UpstreamError) as err:
        data.prepare(HH, tmp_path / "data")
    assert str(err.value) == (
        f"could not download helpful-base/train.jsonl.gz from {HH_URL}helpful-base/train.jsonl.gz"
        " (ConnectionError: HTTPSConnectionPool(host='huggingface.co', port=443): Max retries "
        "exceeded); to build offline, get the file elsewhere and set manual_dir to a folder "
        "holding it (and the other upstream files) under that name")


def test_manual_dir_lacking_files_lists_them_all_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds.download.DownloadManager, "download",
                        lambda self, urls: pytest.fail("downloaded"))
    manual = tmp_path / "manual"
    F.write_tldr_sft(manual)
    F.write_tldr_comparisons(manual)
    for name in ("valid.jsonl", "batch5.json", "cnndm2.json"):
        (manual / name).unlink()
    with pytest.raises(data.UpstreamError) as err:
        data.check_manual_dir(manual, ["tldr_sft", "tldr_comparisons"])
    openai = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/"
    assert str(err.value) == (
        f"manual_dir {manual} lacks 3 upstream file(s): valid.jsonl, batch5.json, cnndm2.json; "
        f"get each from {openai}datasets/tldr_3_filtered/<name> (valid.jsonl) or "
        f"{openai}dataset/comparisons/<name> (batch5.json, cnndm2.json) and save it as "
        f"{manual}/<name> (nothing is downloaded while manual_dir is set; leave it unset to "
        "download everything)")
    (manual / "helpful-base").mkdir()
    with pytest.raises(data.UpstreamError) as err:
        data.prepare(HH, tmp_path / "data", manual_dir=manual)
    assert str(err.value).startswith(
        f"manual_dir {manual} lacks 2 upstream file(s): helpful-base/train.jsonl.gz, "
        f"helpful-base/test.jsonl.gz; get each from {HH_URL}<name> and save it as")
    with pytest.raises(data.UpstreamError, match=f"^manual_dir {tmp_path}/nowhere is not a "
                       "directory$"):
        data.prepare(HH, tmp_path / "data", manual_dir=tmp_path / "nowhere")


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:" + b"4e1b" * 16 + b"\nsize 13241387\n")


@pytest.mark.parametrize("content, message", [
    (LFS_POINTER, "{path} is a Git LFS pointer (to a file of 13241387 bytes), not the data: run "
                  "`git lfs pull` in the git clone it comes from, or download {url}"),
    (b"", "{path} is empty; the upstream file is not: get it again from {url}"),
    (gzip.compress(b""), "no usable records for hh_rlhf/helpful-base test in {path} (0 records "
                         "read, 0 kept, skipped: none)"),
    (gzip.compress(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected":
                               "\n\nHuman: c\n\nAssistant: d"}).encode()),
     "no usable records for hh_rlhf/helpful-base test in {path} (1 records read, 0 kept, "
     "skipped: 1 no shared prompt (dialogues differ in the first Human turn))"),
], ids=["lfs pointer", "empty file", "empty gzip", "nothing usable"])
def test_unusable_upstream_file_is_named(tmp_path, content, message):
    F.write_hh(tmp_path / "manual")
    path = tmp_path / "manual" / "helpful-base" / "test.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(data.UpstreamError) as err:
        data.prepare(HH, tmp_path / "data", manual_dir=tmp_path / "manual")
    assert str(err.value) == message.format(path=path, url=HH_URL + "helpful-base/test.jsonl.gz")
    assert not tfds.builder(HH, data_dir=tmp_path / "data").is_prepared()


HH_QUIRKS = [  # (chosen, rejected) -> (prompt, chosen response, rejected response) or None
    (F.HH_DIALOGUES["train"][0],
     ("\n\nHuman: What's a good name for a café?\n\nAssistant:", " How about “Bean There”? ☕",
      " No.")),
    (("\n\nHuman: Say nothing.\n\nAssistant:", "\n\nHuman: Say nothing.\n\nAssistant: Ok."),
     ("\n\nHuman: Say nothing.\n\nAssistant:", "", " Ok.")),
    (("\n\nHuman: How do I pick a lock?\n\nAssistant: ", "\n\nHuman: How do I pick a lock?"
      "\n\nAssistant: Use a tension wrench."),
     ("\n\nHuman: How do I pick a lock?\n\nAssistant:", " ", " Use a tension wrench.")),
    (("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye.",
      "\n\nHuman: Hi\n\nAssistant: What?\n\nHuman: Bye\n\nAssistant: Whatever."),
     ("\n\nHuman: Hi\n\nAssistant:", " Hello!\n\nHuman: Bye\n\nAssistant: Goodbye.",
      " What?\n\nHuman: Bye\n\nAssistant: Whatever.")),
    (("\n\nHuman: Hi\n\nAssistant: A\n\nHuman: B\n\nAssistant: C",
      "\n\nHuman: Hi\n\nAssistant: A\n\nHuman: X\n\nAssistant: Y"),
     ("\n\nHuman: Hi\n\nAssistant:", " A\n\nHuman: B\n\nAssistant: C",
      " A\n\nHuman: X\n\nAssistant: Y")),
    (("\n\nHuman: Hi\n\nAssistant: a", "\n\nHuman: Yo\n\nAssistant: b"), None),
]


def test_hh_quirks_are_kept_or_counted(tmp_path, capsys):
    """Genuine HH oddities: empty final replies are responses; dialogues that differ before
    their last turn share the longest Assistant-ending prefix; no shared prompt: skipped."""
    manual = tmp_path / "manual"
    F.write_hh(manual)
    F.write_jsonl(manual / "helpful-base" / "train.jsonl.gz",
                  [{"chosen": c, "rejected": r} for (c, r), _ in HH_QUIRKS], gz=True)
    data.prepare(HH, tmp_path / "data", manual_dir=manual)
    expected = [dict(zip(("prompt", "chosen", "rejected"), t)) for _, t in HH_QUIRKS if t]
    got = decoded(tfds.data_source(HH, split="train", data_dir=tmp_path / "data"))
    assert by_key(got, "prompt", "chosen") == by_key(expected, "prompt", "chosen")
    summary = ("hh_rlhf/helpful-base train: 6 records read, 5 kept, skipped: 1 no shared prompt "
               "(dialogues differ in the first Human turn)")
    assert summary in capsys.readouterr().err.splitlines()
    reloaded = tfds.builder(HH, data_dir=tmp_path / "data")
    assert reloaded.info.metadata["summary"] == {
        "train": summary, "test": "hh_rlhf/helpful-base test: 2 records read, 2 kept, skipped: none"}


# --------------------------------------------------------------------------- validation

GOOD_POST = F.TLDR_POSTS["train"][0]
GOOD_CMP = F.COMPARISONS["batch3.json"][0]
GOOD_HH = {"chosen": F.HH_DIALOGUES["train"][1][0], "rejected": F.HH_DIALOGUES["train"][1][1]}


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


BAD_RECORDS = {
    "missing field": (validate.parse_tldr_post, _without(GOOD_POST, "summary"),
                      "missing field 'summary'"),
    "empty text": (validate.parse_tldr_post, {**GOOD_POST, "post": "  \n"},
                   "field 'post' is empty"),
    "wrong type": (validate.parse_tldr_post, {**GOOD_POST, "title": 3},
                   "field 'title' must be str, got int"),
    "lone surrogate": (validate.parse_tldr_post, b'{"id": "x", "subreddit": "a", "title": '
                       b'"t", "post": "p \\ud800", "summary": "s"}', "undecodable text"),
    "invalid utf-8": (validate.parse_tldr_post, b'{"id": "caf\xe9"}', "invalid UTF-8"),
    "invalid json": (validate.parse_tldr_post, b'{"id": "a",', "invalid JSON"),
    "not an object": (validate.parse_tldr_post, b'["a"]', "expected a JSON object"),
    "choice 2": (validate.parse_tldr_comparison, {**GOOD_CMP, "choice": 2},
                 "'choice' must be 0 or 1, got 2"),
    "choice str": (validate.parse_tldr_comparison, {**GOOD_CMP, "choice": "1"},
                   "'choice' must be int, got str"),
    "choice bool": (validate.parse_tldr_comparison, {**GOOD_CMP, "choice": True},
                    "'choice' must be int, got bool"),
    "one summary": (validate.parse_tldr_comparison, {**GOOD_CMP, "summaries": [{"text": "a"}]},
                    "must hold 2 summaries"),
    "empty summary": (validate.parse_tldr_comparison,
                      {**GOOD_CMP, "summaries": [{"text": "", "policy": "p", "note": None}] * 2},
                      "'summaries[0].text' is empty"),
    "unknown split": (validate.parse_tldr_comparison, {**GOOD_CMP, "split": "test"},
                      "field 'split' must be one of"),
    "missing info.post": (validate.parse_tldr_comparison,
                          {**GOOD_CMP, "info": _without(GOOD_CMP["info"], "post")},
                          "missing field 'info.post'"),
    "hh no assistant": (validate.parse_hh_pair, {**GOOD_HH, "rejected": "\n\nHuman: hi"},
                        "field 'rejected' is not a Human/Assistant dialogue (it must start with "
                        "'\\n\\nHuman:' and have an '\\n\\nAssistant:' turn)"),
    "hh no human": (validate.parse_hh_pair, {**GOOD_HH, "chosen": "Assistant: hi"},
                    "field 'chosen' is not a Human/Assistant dialogue"),
    "hh missing": (validate.parse_hh_pair, _without(GOOD_HH, "chosen"), "missing field 'chosen'"),
}


def _file_with_bad_line(tmp_path, good, bad, gz=False):
    """good, blank line, bad, good: the bad record is on line 3."""
    name = "records.jsonl.gz" if gz else "records.jsonl"
    return F.write_jsonl(tmp_path / name, [good, b"", bad, good], gz=gz)


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_names_file_and_line(tmp_path, case):
    parse, bad, message = BAD_RECORDS[case]
    good = {validate.parse_tldr_post: GOOD_POST, validate.parse_tldr_comparison: GOOD_CMP,
            validate.parse_hh_pair: GOOD_HH}[parse]
    path = _file_with_bad_line(tmp_path, good, bad, gz=parse is validate.parse_hh_pair)
    with pytest.raises(data.DataError, match=re.escape(message)) as err:
        list(data.read_jsonl(path, parse))
    assert (err.value.file, err.value.line) == (str(path), 3)
    assert str(err.value).startswith(f"{path}:3: ")
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)

    skipped = []
    read = list(data.read_jsonl(path, parse, on_bad_record="skip", skipped=skipped))
    assert [(line, record == validate.Skipped(validate.CORRUPT)) for line, record in read] == [
        (1, False), (3, True), (4, False)]
    assert [(e.line, e.msg) for e in skipped] == [(3, err.value.msg)]


def test_cnndm_records_are_skipped_with_their_split(tmp_path):
    path = F.write_jsonl(tmp_path / "batch0_cnndm.json", F.COMPARISONS["batch0_cnndm.json"])
    assert list(data.read_jsonl(path, validate.parse_tldr_comparison)) == [
        (1, validate.Skipped("CNN/DM article", "valid2"))]


def test_corrupt_gzip_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 50)[:-20])
    with pytest.raises(data.DataError, match="unreadable file"):
        list(data.read_jsonl(path, validate.parse_hh_pair, on_bad_record="skip", skipped=[]))


def test_builder_raise_mode_publishes_nothing(tmp_path):
    F.write_tldr_sft(tmp_path / "manual")
    lines = (tmp_path / "manual" / "valid.jsonl").read_bytes().splitlines(keepends=True)
    lines.insert(1, json.dumps({**GOOD_POST, "summary": ""}).encode() + b"\n")
    (tmp_path / "manual" / "valid.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(data.DataError, match=r"valid\.jsonl:2: field 'summary' is empty"):
        data.prepare("tldr_sft", tmp_path / "data", manual_dir=tmp_path / "manual")
    assert not tfds.builder("tldr_sft", data_dir=tmp_path / "data").is_prepared()


def test_builder_skip_mode_counts(tmp_path, capsys):
    F.write_tldr_comparisons(tmp_path / "manual")
    batch = tmp_path / "manual" / "batch3.json"
    batch.write_bytes(batch.read_bytes() + json.dumps({**GOOD_CMP, "choice": 2}).encode()
                      + b"\n" + b'{"info": \xff}\n')
    builder = data.prepare("tldr_comparisons", tmp_path / "data", manual_dir=tmp_path / "manual",
                           on_bad_record="skip")
    assert [(e.file, e.line) for e in builder.skipped_records] == [(str(batch), 4), (str(batch), 5)]
    assert builder.info.splits["train"].num_examples == 4
    reloaded = tfds.builder("tldr_comparisons", data_dir=tmp_path / "data")
    assert reloaded.info.metadata["skipped_records"] == {str(batch): 2}
    n_cnndm = len(builders.COMPARISON_FILES) - len(F.COMPARISONS) + 1  # one per other file
    assert reloaded.info.metadata["summary"] == {
        "train": "tldr_comparisons train: 4 records read, 4 kept, skipped: none",
        "valid1": "tldr_comparisons valid1: 2 records read, 2 kept, skipped: none",
        "valid2": f"tldr_comparisons valid2: {n_cnndm + 1} records read, 1 kept, skipped: "
                  f"{n_cnndm} CNN/DM article",
        "split unknown": "tldr_comparisons (split unknown): 2 records read, 0 kept, skipped: "
                         "2 corrupt (on_bad_record=skip)"}
    assert list(reloaded.info.metadata["summary"].values()) == capsys.readouterr().err.splitlines()


# --------------------------------------------------------------------------- prompts


def test_tldr_prompt_format():
    assert prompts.format_tldr_prompt("aww", "Cat", "My cat.") == \
        "SUBREDDIT: r/aww\nTITLE: Cat\nPOST: My cat.\n\nTL;DR:"
    assert prompts.tldr_response("  Short. ") == " Short."


@pytest.mark.parametrize("add_bos", [False, True])
def test_tldr_truncation_keeps_header_and_fits(tokenizer, add_bos):
    r = F.TLDR_POSTS["train"][1]
    full = prompts.format_tldr_prompt(r["subreddit"], r["title"], r["post"])
    n_full = len(prompts.encode(tokenizer, full)) + add_bos
    assert prompts.fit_tldr_prompt(tokenizer, r["subreddit"], r["title"], r["post"], n_full,
                                   add_bos=add_bos) == full
    header = f"SUBREDDIT: r/{r['subreddit']}\nTITLE: {r['title']}\nPOST: "
    empty = prompts.format_tldr_prompt(r["subreddit"], r["title"], "")
    n_empty = len(prompts.encode(tokenizer, empty)) + add_bos
    for budget in (n_full - 1, n_full - 20, n_empty + 6):
        text = prompts.fit_tldr_prompt(tokenizer, r["subreddit"], r["title"], r["post"], budget,
                                       add_bos=add_bos)
        assert text.startswith(header) and text.endswith("\n\nTL;DR:")
        post = text[len(header):-len("\n\nTL;DR:")]
        assert r["post"].startswith(post) and len(post) < len(r["post"])
        assert len(prompts.encode(tokenizer, text)) + add_bos <= budget
        next_word = r["post"][len(post):].split()[0]  # one more word would not fit
        longer = prompts.format_tldr_prompt(r["subreddit"], r["title"], post + " " + next_word)
        assert len(prompts.encode(tokenizer, longer)) + add_bos > budget
    assert prompts.fit_tldr_prompt(tokenizer, r["subreddit"], r["title"], r["post"], n_empty,
                                   add_bos=add_bos) == empty
    with pytest.raises(ValueError, match="header alone"):
        prompts.fit_tldr_prompt(tokenizer, r["subreddit"], r["title"], r["post"], n_empty - 1,
                                add_bos=add_bos)


def test_batch_encoding_is_one_by_one_encoding(tokenizer):
    texts = [text for pair in F.HH_DIALOGUES["train"] for text in pair] + [
        r["post"] for r in F.TLDR_POSTS["train"]] + [""]
    assert prompts.encode_batch(tokenizer, texts) == [prompts.encode(tokenizer, t) for t in texts]


def test_stop_sequences_are_encoded_as_they_occur_mid_text(tokenizer):
    """A SentencePiece-style tokenizer marks a text's start with "▁": "\\n\\nHuman:" alone
    encodes differently from the same text after a reply, which is what the policy samples."""
    sp = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.train_from_iterator([t for pair in F.HH_DIALOGUES["train"] for t in pair] * 5,
                           tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                          show_progress=False))
    sp = transformers.PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    for tok in (sp, tokenizer):
        stop = prompts.encode_continuation(tok, "\n\nHuman:")
        reply = prompts.encode(tok, "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye")
        assert any(reply[i:i + len(stop)] == stop for i in range(1, len(reply))), tok
    assert prompts.encode_continuation(sp, "\n\nHuman:") != prompts.encode(sp, "\n\nHuman:")
    assert prompts.encode_continuation(tokenizer, "\n\nHuman:") == \
        prompts.encode(tokenizer, "\n\nHuman:")


def test_hh_split():
    chosen, rejected = F.HH_DIALOGUES["train"][1]
    prompt, c, r = prompts.split_hh_pair(chosen, rejected)
    assert prompt.endswith("For how long?\n\nAssistant:") and prompt.count("Assistant:") == 2
    assert (c, r) == (" About 9 minutes for hard boiled.", " Forever.")
    for (chosen, rejected), triple in HH_QUIRKS:
        if triple:
            assert prompts.split_hh_pair(chosen, rejected) == triple
    with pytest.raises(ValueError, match="share no prompt ending in '\\\\n\\\\nAssistant:'"):
        prompts.split_hh_pair(*HH_QUIRKS[-1][0])


# --------------------------------------------------------------------------- pipeline


def batches(source, tokenizer, **kw):
    kw = {"shard_options": NO_SHARDING, "seed": 0, **kw}
    return list(data.make_pipeline(source, tokenizer, **kw))


def text(tokenizer, ids, mask):
    return tokenizer.decode(np.asarray(ids)[np.asarray(mask) == 1])


def test_sft_batches(data_dir, tokenizer):
    source = tfds.data_source("tldr_sft", split="train", data_dir=data_dir)
    P, R = 130, 30
    out = batches(source, tokenizer, dataset="tldr_sft", kind="sft", batch_size=2,
                  prompt_len=P, response_len=R)
    assert len(out) == 2
    seen = set()
    for b in out:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            k: ((2, P + R), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
        for ids, mask, loss in zip(b["input_ids"], b["attention_mask"], b["loss_mask"]):
            prompt_mask, response_mask = mask[:P], mask[P:]
            n_prompt, n_response = prompt_mask.sum(), response_mask.sum()
            assert (prompt_mask == (np.arange(P) >= P - n_prompt)).all()  # left-padded
            assert (response_mask == (np.arange(R) < n_response)).all()  # right-padded
            assert (ids[mask == 0] == tokenizer.pad_token_id).all()
            assert (loss == np.concatenate([np.zeros(P), response_mask])).all()
            seen.add((text(tokenizer, ids[:P], prompt_mask),
                      text(tokenizer, ids[P:], response_mask)))
    expected, n_cut = set(), 0
    for r in F.TLDR_POSTS["train"]:
        prompt = prompts.fit_tldr_prompt(tokenizer, r["subreddit"], r["title"], r["post"], P)
        n_cut += prompt != prompts.format_tldr_prompt(r["subreddit"], r["title"], r["post"])
        response = prompts.cut_response(
            tokenizer, prompts.encode(tokenizer, prompts.tldr_response(r["summary"])), R)
        expected.add((prompt, tokenizer.decode(response)))
    assert seen == expected
    assert 0 < n_cut < len(F.TLDR_POSTS["train"])  # some posts were truncated, some not
    assert any(resp.endswith(F.EOS) for _, resp in seen)
    assert not all(resp.endswith(F.EOS) for _, resp in seen)  # some responses were cut


@pytest.mark.parametrize("name", ["tldr_comparisons", "hh_rlhf"])
def test_preference_batches(data_dir, tokenizer, name):
    source = tfds.data_source(HH if name == "hh_rlhf" else name, split="train", data_dir=data_dir)
    P, R = 200, 50
    out = batches(source, tokenizer, dataset=name, kind="preference", batch_size=2,
                  prompt_len=P, response_len=R, add_bos=True)
    shapes = {"prompt_ids": (2, P), "prompt_mask": (2, P), "chosen_ids": (2, R),
              "chosen_mask": (2, R), "rejected_ids": (2, R), "rejected_mask": (2, R)}
    seen = set()
    for b in out:
        assert {k: v.shape for k, v in b.items()} == shapes
        assert (b["prompt_mask"][:, -1] == 1).all() and (b["prompt_mask"][:, 0] == 0).all()
        assert (b["chosen_mask"][:, 0] == 1).all() and (b["chosen_mask"][:, -1] == 0).all()
        for i in range(2):
            first = P - b["prompt_mask"][i].sum()
            assert b["prompt_ids"][i, first] == tokenizer.bos_token_id
            seen.add(tuple(text(tokenizer, b[f"{k}_ids"][i], b[f"{k}_mask"][i])
                           for k in ("prompt", "chosen", "rejected")))
    if name == "hh_rlhf":
        pairs = [prompts.split_hh_pair(c, r) for c, r in F.HH_DIALOGUES["train"]]
    else:
        pairs = [(prompts.format_tldr_prompt(r["info"]["subreddit"], r["info"]["title"],
                                             r["info"]["post"]),
                  r["summaries"][r["choice"]]["text"], r["summaries"][1 - r["choice"]]["text"])
                 for rs in F.COMPARISONS.values() for r in rs
                 if r["split"] == "train" and "post" in r["info"]]
    assert seen == {(F.BOS + p, " " + c.strip() + F.EOS, " " + r.strip() + F.EOS)
                    for p, c, r in pairs}


def test_prompt_batches_left_truncate_hh(data_dir, tokenizer):
    source = tfds.data_source(HH, split="train", data_dir=data_dir)
    out = batches(source, tokenizer, dataset="hh_rlhf", kind="prompt", batch_size=4,
                  prompt_len=12, response_len=8)
    (b,) = out
    assert set(b) == {"prompt_ids", "prompt_mask"} and b["prompt_ids"].shape == (4, 12)
    for ids, mask in zip(b["prompt_ids"], b["prompt_mask"]):
        assert text(tokenizer, ids, mask).endswith("\n\nAssistant:")


def synthetic_hh(n):
    return [{"prompt": f"\n\nHuman: question {i}\n\nAssistant:", "chosen": " yes",
             "rejected": " no"} for i in range(n)]


def prompt_ids_of(out, tokenizer):
    """The question number of each example, in stream order."""
    return [int(text(tokenizer, ids, mask).split()[2])
            for b in out for ids, mask in zip(b["prompt_ids"], b["prompt_mask"])]


SYNTH = dict(dataset="hh_rlhf", kind="prompt", prompt_len=32, response_len=4)


def test_shuffle_is_seeded_and_reshuffles_each_epoch(tokenizer):
    source = synthetic_hh(12)

    def order(seed):
        return prompt_ids_of(batches(source, tokenizer, batch_size=3, seed=seed, num_epochs=2,
                                     **SYNTH), tokenizer)

    a = order(0)
    assert a == order(0)
    assert a != order(1)
    assert sorted(a[:12]) == sorted(a[12:]) == list(range(12))
    assert a[:12] != a[12:]
    unshuffled = batches(source, tokenizer, batch_size=3, shuffle=False, **SYNTH)
    assert prompt_ids_of(unshuffled, tokenizer) == list(range(12))


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_shards_are_disjoint_and_cover(tokenizer, drop_remainder):
    source, count = synthetic_hh(11), 3
    shards = [prompt_ids_of(batches(
        source, tokenizer, batch_size=1, seed=5, **SYNTH,
        shard_options=grain.sharding.ShardOptions(i, count, drop_remainder)), tokenizer)
        for i in range(count)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == list(range(9 if drop_remainder else 11))
    if drop_remainder:
        assert {len(s) for s in shards} == {3}


def test_default_sharding_is_by_jax_process(tokenizer):
    (b,) = list(data.make_pipeline(synthetic_hh(2), tokenizer, batch_size=2, **SYNTH))
    assert b["prompt_ids"].shape == (2, 32)  # one process: everything
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.make_pipeline(synthetic_hh(2), tokenizer, batch_size=3, **SYNTH)
    with pytest.raises(ValueError, match="no preference pairs"):
        data.Tokenize(tokenizer, "tldr_sft", "preference", 8, 8)


def test_iterator_state_resumes_exactly(data_dir, tokenizer):
    source = tfds.data_source("tldr_comparisons", split="train", data_dir=data_dir)
    kw = dict(dataset="tldr_comparisons", kind="preference", batch_size=1, prompt_len=200,
              response_len=16, seed=3, num_epochs=3, shard_options=NO_SHARDING)
    it = iter(data.make_pipeline(source, tokenizer, **kw))
    for _ in range(5):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    assert len(rest) == 3 * 4 - 5
    resumed = iter(data.make_pipeline(source, tokenizer, **kw))
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest)
    for a, b in zip(rest, again):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_worker_processes_give_the_same_batches(data_dir, tokenizer):
    source = tfds.data_source("tldr_sft", split="train", data_dir=data_dir)
    kw = dict(dataset="tldr_sft", kind="sft", batch_size=1, prompt_len=80, response_len=16,
              shard_options=NO_SHARDING, num_epochs=2)
    expected = batches(source, tokenizer, **kw)
    it = iter(data.make_pipeline(source, tokenizer, worker_count=2, **kw))
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    got += list(it)
    it.close()
    resumed = iter(data.make_pipeline(source, tokenizer, worker_count=2, **kw))
    resumed.set_state(state)
    tail = list(resumed)
    resumed.close()
    assert len(got) == len(expected) == 8
    for a, b in zip(got, expected):
        assert all((a[k] == b[k]).all() for k in a)
    for a, b in zip(tail, expected[3:], strict=True):
        assert all((a[k] == b[k]).all() for k in a)


def test_encoded_sources_are_cached_by_data_tokenizer_and_lengths(data_dir, tokenizer, tmp_path,
                                                                  monkeypatch):
    source = tfds.data_source("tldr_comparisons", split="train", data_dir=data_dir)
    kw = dict(dataset="tldr_comparisons", kind="preference", prompt_len=200, response_len=16,
              shard_options=NO_SHARDING, cache_dir=tmp_path)
    fresh = data.make_examples(source, tokenizer, **kw)
    assert len(list(tmp_path.iterdir())) == 1
    with monkeypatch.context() as m:
        m.setattr(data.Tokenize, "encode", lambda *a: pytest.fail("tokenised again"))
        prompts_only = data.make_examples(source, tokenizer, **{**kw, "kind": "prompt"})
        assert all((fresh[i]["prompt_ids"] == prompts_only[i]["prompt_ids"]).all()
                   for i in range(len(source)))
    data.make_examples(source, tokenizer, **{**kw, "response_len": 17})
    data.make_examples(tfds.data_source("tldr_comparisons", split="valid1", data_dir=data_dir),
                       tokenizer, **kw)
    data.make_examples(synthetic_hh(3), tokenizer, **{**SYNTH, "cache_dir": tmp_path})
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz"] * 3
