"""Real-data tasks offline: `TextRLHF` on the upstream-format fixtures, the `smoke=true` runs of
EXP=tldr and EXP=hh end to end (SFT -> RM -> P3O on 8 fake devices), and a bad upstream record
stopping the run before anything compiles."""
import json
import os
import re

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from p3o_jax import config_args
from p3o_jax import data, hf, pipeline
from p3o_jax.cli.train import main
from p3o_jax import model as M
from p3o_jax.data import fixtures


@pytest.fixture(autouse=True, scope="module")
def quick_compiles():
    """These runs check the plumbing, not speed: XLA's optimisations off halves compile time."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def smoke_args(tmp_path, exp, *extra):
    return [f"exp={exp}", "smoke=true", f"out_dir={tmp_path}", *extra]


def records(path, stage):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


@pytest.fixture(scope="module")
def tldr_task(tmp_path_factory):
    """The smoke run's TL;DR task (no model involved)."""
    cfg = config_args.from_args(smoke_args(tmp_path_factory.mktemp("tldr_task"), "tldr"))
    return pipeline.make_task(cfg), cfg


def test_tldr_task_batches_are_static_and_addressed_by_step(tldr_task):
    task, cfg = tldr_task
    P, N = cfg.data.prompt_len, cfg.data.response_len
    assert (P, N) == (task.prompt_len, task.response_len) and task.gold_reward is None
    b = task.sft_batch(8, 3)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: ((8, P + N), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    again = pipeline.make_task(cfg).sft_batch(8, 3)          # a resumed run: same batch at step 3
    assert all((b[k] == again[k]).all() for k in b)
    assert not (task.sft_batch(8, 4)["input_ids"] == b["input_ids"]).all()
    for split in ("rm", "rl", "eval"):
        ids, mask = task.prompts(6, split, start=5)
        assert ids.shape == mask.shape == (6, P)
        assert (mask[:, -1] == 1).all()                      # left-padded
        texts = task.decode(ids, mask)
        assert all(t.startswith("SUBREDDIT: r/") and t.endswith("\n\nTL;DR:") for t in texts)
    eval_titles = {r["title"] for r in fixtures.TLDR_POSTS["test"]}
    assert all(t.split("\n")[1][len("TITLE: "):] in eval_titles
               for t in task.decode(*task.prompts(8, "eval")))


def test_tldr_preferences_are_the_human_labels(tldr_task):
    task, cfg = tldr_task
    pairs = task.preference_data(6, sample=None, seed=0)
    P, N = task.prompt_len, task.response_len
    assert pairs["tokens"].shape == pairs["mask"].shape == (6, 2, P + N)
    assert pairs["resp_mask"].shape == (6, 2, N) and "gold" not in pairs
    labelled = {}
    for recs in fixtures.COMPARISONS.values():
        for r in recs:
            if r["split"] == "train":
                labelled[r["info"]["title"]] = (r["summaries"][r["choice"]]["text"].strip(),
                                                r["summaries"][1 - r["choice"]]["text"].strip())
    rm_prompts = task.decode(*task.prompts(6, "rm"))
    for i in range(6):
        prompt = task.decode(pairs["tokens"][i, :1, :P], pairs["mask"][i, :1, :P])[0]
        assert prompt == rm_prompts[i]                       # "rm" prompts: the pairs' prompts
        responses = task.decode(pairs["tokens"][i, :, P:], pairs["resp_mask"][i])
        for text, label in zip(responses, labelled[prompt.split("\n")[1][len("TITLE: "):]]):
            assert text and (" " + label).startswith(text)     # cut to N tokens


def test_read_batch_wraps_into_reshuffled_epochs():
    """Index access over two concatenated sources: each epoch is one permutation of all."""
    sources = [[{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": " a", "rejected": " b"}
                for i in range(start, start + 3)] for start in (0, 3)]
    tok = fixtures.tiny_tokenizer()
    ds = data.make_examples(data.Concatenated(sources), tok, dataset="hh_rlhf", kind="prompt",
                            prompt_len=16, response_len=4, seed=1,
                            shard_options=grain.sharding.NoSharding())
    b = data.read_batch(ds, 0, 12)
    assert b["prompt_ids"].shape == (12, 16)
    order = [int(re.search(r"q(\d+)", tok.decode(ids[m == 1])).group(1))
             for ids, m in zip(b["prompt_ids"], b["prompt_mask"])]
    assert sorted(order[:6]) == sorted(order[6:]) == list(range(6)) and order[:6] != order[6:]
    tail = data.read_batch(ds, 4, 5)
    assert (tail["prompt_ids"] == b["prompt_ids"][4:9]).all()


def check_run(path, summary, algo="p3o"):
    for stage in ("sft", "rm", f"rl:{algo}"):
        logged = records(path, stage)
        assert logged, f"stage {stage} logged nothing"
        for r in logged:
            assert all(np.isfinite(v) for v in r.values() if isinstance(v, float)), r
    rows = {r["policy"]: r for r in summary["rows"]}
    assert set(rows) == {"sft", algo}
    assert all(np.isfinite(v) for row in rows.values() for v in row.values()
               if isinstance(v, float))
    for name in ("sft", "rm", algo, "config.json", "summary.json", "preferences.npz", "tb"):
        assert os.path.exists(os.path.join(path, name)), name


def test_tldr_smoke_runs_every_stage(tmp_path, capsys):
    assert main(smoke_args(tmp_path, "tldr")) == 0
    with open(tmp_path / "summary.json") as f:
        check_run(tmp_path, json.load(f))
    sft = records(tmp_path, "sft")
    assert sft[-1]["loss"] < sft[0]["loss"]
    assert "TL;DR:" in capsys.readouterr().out              # the decoded samples
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["smoke"] is True
    prefs = np.load(tmp_path / "preferences.npz")
    assert prefs["tokens"].shape == (80, 2, 96 + 16)


def test_hh_smoke_from_a_saved_base_model(tmp_path):
    """HH over two subsets, SFT starting from an HF folder: the policy config is the folder's."""
    policy = config_args.smoke_config(config_args.load_experiment("hh")).policy
    base = tmp_path / "base"
    hf.save_pretrained(M.init_params(policy, jax.random.key(7)), policy, str(base))
    args = smoke_args(tmp_path / "run", "hh", f"base_model={base}", "policy.d_model=16",
                      "data.hh_subsets=helpful-base,harmless-base")
    summary = pipeline.run_experiment(config_args.from_args(args))
    check_run(tmp_path / "run", summary)
    with open(tmp_path / "run" / "config.json") as f:
        saved = json.load(f)
    assert saved["policy"]["d_model"] == policy.d_model      # from base_model, not the override
    assert saved["base_model"] == str(base)


def _corrupt_record(manual):
    bad = dict(fixtures.COMPARISONS["batch3.json"][1], choice=2)
    fixtures.write_jsonl(manual / "batch3.json", [fixtures.COMPARISONS["batch3.json"][0], bad])
    return f"{manual}/batch3.json:2: field 'choice' must be 0 or 1, got 2"


def _missing_files(manual):
    (manual / "test.jsonl").unlink()
    (manual / "batch7.json").unlink()
    return f"manual_dir {manual} lacks 2 upstream file(s): test.jsonl, batch7.json; get each from"


def _lfs_pointer(manual):
    (manual / "batch12.json").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0a" * 32 + "\nsize 2917\n")
    return f"{manual}/batch12.json is a Git LFS pointer (to a file of 2917 bytes), not the data"


def _empty_file(manual):
    (manual / "valid.jsonl").write_bytes(b"")
    return f"{manual}/valid.jsonl is empty; the upstream file is not: get it again from https://"


@pytest.mark.parametrize("spoil", [_corrupt_record, _missing_files, _lfs_pointer, _empty_file])
def test_unusable_upstream_data_stops_the_run_before_compiling(tmp_path, monkeypatch, capsys,
                                                               spoil):
    """One line, exit 2, nothing built, compiled or downloaded."""
    manual = tmp_path / "upstream"
    fixtures.write_upstream(manual, "tldr", ())
    message = spoil(manual)
    monkeypatch.setattr(pipeline, "initial_policy", lambda run: pytest.fail("got to SFT"))
    monkeypatch.setattr(tfds.download.DownloadManager, "download",
                        lambda self, urls: pytest.fail("downloaded"))
    assert main(smoke_args(tmp_path / "run", "tldr", f"data.manual_dir={manual}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {message}"), err
    assert not any(line.startswith("error") or "Traceback" in line for line in err[:-1]), err
    assert not os.path.exists(tmp_path / "run" / "sft")


def test_hh_task_stops_at_the_next_human_turn(tmp_path):
    """HH's default stop sequence, in the task's tokens (several of them), ends a sampled turn;
    TL;DR has none."""
    cfg = config_args.from_args(smoke_args(tmp_path, "hh", "data.hh_subsets=helpful-base"))
    task = pipeline.make_task(cfg)
    (stop,) = task.stop_sequences
    assert len(stop) > 1 and task.tokenizer.decode(stop) == "\n\nHuman:"
    assert config_args.from_args(["exp=tldr"]).data.stop_sequence_list == ()


def test_smoke_config_keeps_explicit_overrides():
    cfg = config_args.from_args(["exp=tldr", "sft.steps=7", "smoke=true", "out_dir=/tmp/o"])
    assert (cfg.sft.steps, cfg.out_dir, cfg.base_model) == (7, "/tmp/o", "")
    assert cfg.rl.iterations == 2 and cfg.data.prompt_len == 96
    real = config_args.from_args(["exp=tldr"])
    assert not real.smoke and real.base_model and real.data.prompt_len == 512


@pytest.mark.parametrize("args, key", [
    (["exp=hh", "data.hh_subsets=helpful-basic"], "data.hh_subsets"),
    (["exp=tldr", "data.on_bad_record=ignore"], "data.on_bad_record"),
    (["exp=tldr", "base_model="], "data.tokenizer"),
    (["exp=tldr", "base_model=", "data.tokenizer=gpt2", "policy.max_len=256"], "data.response_len"),
    (["exp=tldr", "data.prompt_len=0"], "data.prompt_len"),
    (["exp=hh", "data.stop_sequences=Human:"], "data.stop_sequences"),
    (["exp=hh", 'data.stop_sequences=[""]'], "data.stop_sequences"),
    (["exp=toy", "smoke=true"], "smoke"),
])
def test_data_config_errors_name_the_key(args, key, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
