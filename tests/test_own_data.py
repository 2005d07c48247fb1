"""Your own data and rewards (`task=dataset`, `reward_fns=`): every file format the sources
take (written here: JSONL, JSON, CSV, conversational Parquet, Arrow, a `save_to_disk` folder;
local, under `~` or at an fsspec URI), the source grammar, TRL's column layouts, chat-template
rendering (tests/test_render.py has the rest), mixing by weight, over-long prompts, every bad
input as one line, reward functions (their calls, checks and failures), the toy task trained by
a reward function equal to its gold reward, and runs with no reward model anywhere."""
import errno
import json
import os
import re
import socket
import subprocess
import sys

import datasets
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p3o_jax import config_args
from p3o_jax.checks import ConfigError
from p3o_jax import hf
from p3o_jax import model as M
from p3o_jax import reward_calls as R
from p3o_jax.cli.train import main
from p3o_jax.data import own
from p3o_jax.data.fixtures import chat_tokenizer
from p3o_jax.data.render import Render
from p3o_jax.data.validate import UpstreamError
from p3o_jax.pipeline import run_experiment
from data_fixtures import verl_rows

HERE = os.path.dirname(os.path.abspath(__file__))
FNS = os.path.join(HERE, "reward_functions.py")
QUESTIONS = [(f"What is {a} + {b}?", str(a + b)) for a in range(10) for b in range(10)]
KEYS = own.Keys()


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same problems in every format; conversational where the format keeps nesting."""
    d = tmp_path_factory.mktemp("own_data")
    conv = [{"prompt": user(q), "answer": a, "level": i % 3} for i, (q, a) in enumerate(QUESTIONS)]
    plain = [{"prompt": q, "answer": a} for q, a in QUESTIONS]
    sft = [{"prompt": user(q), "completion": assistant(f"#### {a}")} for q, a in QUESTIONS]
    messages = [{"messages": user(q) + assistant(f"#### {a}")} for q, a in QUESTIONS]
    explicit = [{"prompt": user(q), "chosen": assistant(a), "rejected": assistant("7")}
                for q, a in QUESTIONS]
    implicit = [{"chosen": user(q) + assistant(a), "rejected": user(q) + assistant("7")}
                for q, a in QUESTIONS]
    out = {"jsonl": write_jsonl(d / "prompts.jsonl", conv),
           "sft_jsonl": write_jsonl(d / "sft.jsonl", sft),
           "explicit": write_jsonl(d / "explicit.jsonl", explicit),
           "implicit": write_jsonl(d / "implicit.jsonl", implicit)}
    with open(d / "prompts.json", "w") as f:
        json.dump(plain, f)
    out["json"] = str(d / "prompts.json")
    datasets.Dataset.from_list(plain).to_csv(str(d / "prompts.csv"), index=False)
    out["csv"] = str(d / "prompts.csv")
    pq.write_table(pa.Table.from_pylist(sft), d / "sft.parquet")
    out["parquet"] = str(d / "sft.parquet")
    table = pa.Table.from_pylist(messages)
    with pa.OSFile(str(d / "messages.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    out["arrow"] = str(d / "messages.arrow")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(conv[:30]),
                          "test": datasets.Dataset.from_list(conv[30:])}).save_to_disk(str(d / "disk"))
    out["disk"] = str(d / "disk")
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "sft_jsonl", "parquet", "arrow",
                                 "explicit", "implicit"])
def test_every_format_gives_the_prompts_and_their_columns(files, fmt):
    r = own.load_records(files[fmt], "data.prompts", "prompt", KEYS, seed=0)
    questions = [q for q, _ in QUESTIONS]
    got = [p if isinstance(p, str) else p[-1]["content"] for p in r.prompts]
    assert got == questions
    if fmt in ("jsonl", "json", "csv"):
        assert [str(a) for a in r.columns["answer"]] == [a for _, a in QUESTIONS]
    if fmt == "jsonl":
        assert r.prompts[0] == user(questions[0]) and r.columns["level"][:4] == [0, 1, 2, 0]
    assert r.origin[3] == f"{files[fmt]} row 3" and r.responses == {}


def test_save_to_disk_folder_and_its_splits(files):
    train = own.load_records(files["disk"], "data.prompts", "prompt", KEYS, seed=0)
    test = own.load_records(files["disk"] + ":split=test", "data.eval", "prompt", KEYS, seed=0)
    assert len(train) == 30 and len(test) == 70
    assert test.prompts[0] == user(QUESTIONS[30][0]) and test.columns["answer"][0] == QUESTIONS[30][1]
    with pytest.raises(UpstreamError, match=r"no split 'valid'; it has \['test', 'train'\]"):
        own.load_records(files["disk"] + ":split=valid", "data.eval", "prompt", KEYS, seed=0)


def test_the_source_grammar_takes_uris_and_hub_names():
    """Options are the trailing `:name=value` parts; a URI's `:` (and a folder named `k=v`)
    stays in its location."""
    got = own.parse_sources("gs://b/year=2024/x.jsonl:split=test:weight=2, openai/gsm8k:"
                            "config=main:split=train,~/d/a.parquet,memory://f.jsonl", "data.sft")
    assert got == [own.Source("gs://b/year=2024/x.jsonl", "test", "", 2.0),
                   own.Source("openai/gsm8k", "train", "main"), own.Source("~/d/a.parquet"),
                   own.Source("memory://f.jsonl")]
    for text, message in [("a.jsonl:splt=test", r"options are split=, config=, weight=.*got splt="),
                          ("a.jsonl:split=a:split=b", r"split= given twice"),
                          ("a.jsonl:weight=0", r"weight must be > 0")]:
        with pytest.raises(UpstreamError, match=message):
            own.parse_sources(text, "data.sft")
    assert [own.is_file_source(s.location) for s in got] == [True, False, True, True]


def test_uris_are_read_through_fsspec(monkeypatch):
    """fsspec's memory filesystem stands for gs:// and s3://: JSONL and Parquet files and a
    save_to_disk folder at URIs read as local ones do; the config check leaves URIs be."""
    import fsspec
    from p3o_jax.checks import Sources
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)   # no hub: memory only
    fs = fsspec.filesystem("memory")
    rows = [{"prompt": user(q), "answer": a} for q, a in QUESTIONS[:6]]
    with fs.open("memory://own/prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with fs.open("memory://own/prompts.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    datasets.Dataset.from_list(rows).save_to_disk("memory://own/disk")
    for location in ("memory://own/prompts.jsonl", "memory://own/prompts.parquet",
                     "memory://own/disk"):
        r = own.load_records(location, "data.prompts", "prompt", KEYS, seed=0)
        assert r.prompts == [row["prompt"] for row in rows], location
        assert r.columns["answer"] == [a for _, a in QUESTIONS[:6]]
        assert r.origin[2] == f"{location} row 2"
        assert Sources().problem(location) is None
    with pytest.raises(UpstreamError, match=r"memory://own/nope.jsonl: no such file"):
        own.load_records("memory://own/nope.jsonl", "data.prompts", "prompt", KEYS, seed=0)


def test_a_path_under_home_is_expanded(files, tmp_path, monkeypatch):
    home = os.path.dirname(files["jsonl"])
    monkeypatch.setenv("HOME", home)
    from p3o_jax.checks import Sources
    assert Sources().problem("~/prompts.jsonl") is None
    assert Sources().problem("~/missing.jsonl") == "no such file or folder: ~/missing.jsonl"
    r = own.load_records("~/prompts.jsonl", "data.prompts", "prompt", KEYS, seed=0)
    assert len(r) == len(QUESTIONS) and r.origin[0] == "~/prompts.jsonl row 0"
    assert own.load_records("~/disk:split=test", "data.eval", "prompt", KEYS, seed=0).prompts[0] \
        == user(QUESTIONS[30][0])


def test_tokenizer_and_model_folders_under_home(tmp_path, monkeypatch, tokenizer):
    from p3o_jax.config import DataConfig
    from p3o_jax.tasks import TextRLHF
    tokenizer.save_pretrained(tmp_path / "tok")
    with open(tmp_path / "tok" / "generation_config.json", "w") as f:   # the model's stop ids
        json.dump({"eos_token_id": [tokenizer.eos_token_id, 7]}, f)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf.resolve("~/tok") == str(tmp_path / "tok")
    task = object.__new__(TextRLHF)
    task.read_tokenizer("~/tok", DataConfig(), "~/tok")
    assert task.tokenizer.chat_template == tokenizer.chat_template
    assert task.eos_ids == (tokenizer.eos_token_id, 7)


def test_chat_template_kwargs_reach_the_task(files, tmp_path):
    """`data.chat_template_kwargs` from the config to every prompt the sampler sees, and
    checked as a JSON object without the keys the pipeline sets itself."""
    from p3o_jax.checks import JsonObject
    from p3o_jax.config import RESERVED_TEMPLATE_KEYS, DataConfig
    from p3o_jax.tasks import DatasetRLHF
    tok = chat_tokenizer()
    tok.chat_template = CHATML_THINKING
    tok.save_pretrained(tmp_path / "tok")
    cfg = DataConfig(prompts=files["jsonl"], prompt_len=48, response_len=4,
                     chat_template_kwargs='{"enable_thinking": false}')
    task = DatasetRLHF(cfg, str(tmp_path / "tok"), 0, 8, str(tmp_path / "cache"))
    ids, mask = task.prompts(4, "rl")
    assert all(p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
               for p in tok.batch_decode([i[m == 1] for i, m in zip(ids, mask)]))
    check = JsonObject(RESERVED_TEMPLATE_KEYS)
    assert check.problem('{"enable_thinking": false}') is None
    assert check.problem("[1]") == "'[1]' is not a JSON object, e.g. {\"enable_thinking\": false}"
    assert check.problem('{"tokenize": true}') == "tokenize: set by p3o_jax itself"


CHATML_THINKING = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                   "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and "
                   "enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
                   "{% endif %}")


def test_sft_and_preference_layouts_agree(files):
    completion = own.load_records(files["parquet"], "data.sft", "sft", KEYS, seed=0)
    messages = own.load_records(files["arrow"], "data.sft", "sft", KEYS, seed=0)
    assert completion.prompts == messages.prompts
    assert completion.responses["response"] == messages.responses["response"]
    explicit = own.load_records(files["explicit"], "data.preferences", "preference", KEYS, seed=0)
    implicit = own.load_records(files["implicit"], "data.preferences", "preference", KEYS, seed=0)
    assert explicit.prompts == implicit.prompts and explicit.responses == implicit.responses
    assert explicit.responses["rejected"][0] == assistant("7")


def test_rendering_uses_the_chat_template(files, tokenizer):
    r = own.load_records(files["parquet"], "data.sft", "sft", KEYS, seed=0)
    columns = own.encode(r, Render(tokenizer), 40, 8, "error")
    ex = own.Examples(own_examples(columns, tokenizer, "sft", 40, 8), columns["row"])[2]
    q, a = QUESTIONS[2]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(user(q), tokenize=False,
                                                            add_generation_prompt=True),
                              add_special_tokens=False)
    response = tokenizer.encode(f"#### {a}", add_special_tokens=False) + [tokenizer.eos_token_id]
    ids, mask = ex["input_ids"], ex["attention_mask"]
    assert ids[40 - len(prompt):40].tolist() == prompt and mask[:40].sum() == len(prompt)
    assert ids[40:40 + len(response)].tolist() == response and ex["loss_mask"].sum() == len(response)
    assert ex["row"] == 2
    # a plain prompt stays text unless wrapped as a user turn
    assert Render(tokenizer).prompt("2 + 2 =") == "2 + 2 ="
    assert Render(tokenizer, wrap=True).prompt("2 + 2 =") == tokenizer.apply_chat_template(
        user("2 + 2 ="), tokenize=False, add_generation_prompt=True)


def own_examples(columns, tokenizer, kind, P, N):
    from p3o_jax.data import Tokenize
    from p3o_jax.data.loader import Encoded
    return Encoded(columns, Tokenize(tokenizer, "own", kind, P, N))


@pytest.mark.parametrize("mode", ["error", "truncate", "filter"])
def test_long_prompts_stop_or_are_cut_or_dropped_and_counted(files, tokenizer, mode, capsys):
    r = own.load_records(files["jsonl"], "data.prompts", "prompt", KEYS, seed=0)
    short = own.load_records(files["json"], "data.prompts", "prompt", KEYS, seed=0)
    mixed = own.mix([r, short], [1, 1], seed=0)     # templated prompts are long, plain short
    P = max(len(tokenizer.encode(q, add_special_tokens=False)) for q, _ in QUESTIONS) + 4
    if mode == "error":
        with pytest.raises(UpstreamError, match=rf"{re.escape(files['jsonl'])} row \d+: the "
                                                rf"prompt is \d+ tokens, more than "
                                                rf"data.prompt_len={P} \(and {len(r) - 1} more"):
            own.encode(mixed, Render(tokenizer), P, 4, mode)
        return
    columns = own.encode(mixed, Render(tokenizer), P, 4, mode)
    assert f"{len(r)} of {len(mixed)} prompts (prompt rows) are longer than {P} tokens" in \
        capsys.readouterr().err
    lengths = np.diff(columns["prompt.offsets"])
    assert lengths.max() <= P
    if mode == "filter":
        kept = [mixed.prompts[i] for i in columns["row"]]
        assert len(kept) == len(short) and all(isinstance(p, str) for p in kept)
    else:
        assert len(columns["row"]) == len(mixed)
        start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        templated = [i for i, p in enumerate(mixed.prompts) if not isinstance(p, str)]
        for i in templated:   # the template's head is kept: the cut is in the content
            o = columns["prompt.offsets"]
            assert columns["prompt.ids"][o[i]] == start


def test_the_experiments_prompts_fit_their_prompt_len():
    """experiments/arithmetic.py, smollm2.py and smollm2_steps.py are sized to their data: no
    prompt is cut (the default, long_prompts=error, would stop the run). SmolLM2's own
    tokenizer, with its default system turn, gives 44-46 tokens (under smollm2's 48) and 54-57
    (under smollm2_steps' 80, which also holds this test's ChatML tokenizer's longer
    encoding). Measured; not downloaded here."""
    import transformers
    for exp, tok in (("arithmetic", None), ("smollm2", chat_tokenizer()),
                     ("smollm2_steps", chat_tokenizer())):
        cfg = config_args.load_experiment(exp)
        tok = tok or transformers.AutoTokenizer.from_pretrained(cfg.data.tokenizer)
        assert cfg.data.long_prompts == "error"
        for key in ("sft", "prompts", "eval"):
            if getattr(cfg.data, key):
                kind = "sft" if key == "sft" else "prompt"
                r = own.load_records(getattr(cfg.data, key), key, kind, KEYS, seed=0)
                lengths = [len(tok.encode(Render(tok).prompt(p), add_special_tokens=False))
                           for p in r.prompts]
                assert max(lengths) <= cfg.data.prompt_len, (exp, key, max(lengths))
    cfg = config_args.load_experiment("arithmetic")     # a policy from scratch: its positions
    assert cfg.data.prompt_len + cfg.data.response_len <= cfg.policy.max_len


def test_column_names_are_settings(files, tmp_path):
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"question": q, "solution": a}
                                                    for q, a in QUESTIONS[:5]])
    r = own.load_records(path, "data.sft", "sft", own.Keys(prompt="question",
                                                           completion="solution"), seed=0)
    assert r.prompts == [q for q, _ in QUESTIONS[:5]]
    assert r.responses["response"] == [a for _, a in QUESTIONS[:5]] and r.columns == {}


def test_column_names_are_dotted_paths_into_struct_columns(tmp_path):
    """verl's parquet keeps the question in `extra_info`: data.prompt_key=extra_info.question
    reads it, and the struct column still reaches the reward functions whole."""
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(QUESTIONS[:4])), path)
    r = own.load_records(str(path), "data.prompts", "prompt",
                         own.Keys(prompt="extra_info.question"), seed=0)
    assert r.prompts == [q for q, _ in QUESTIONS[:4]]
    assert [e["question"] for e in r.columns["extra_info"]] == r.prompts
    with pytest.raises(UpstreamError, match=r"row 0: 'extra_info.missing' is missing"):
        own.load_records(str(path), "data.prompts", "prompt",
                         own.Keys(prompt="extra_info.missing"), seed=0)


def test_the_tokenised_data_is_cached_by_content_and_rendering(files, tokenizer, tmp_path):
    r = own.load_records(files["jsonl"], "data.prompts", "prompt", KEYS, seed=0)
    first = own.encode(r, Render(tokenizer), 40, 8, "error", str(tmp_path))
    cached = os.listdir(tmp_path)
    assert len(cached) == 1
    again = own.encode(r, Render(tokenizer), 40, 8, "error", str(tmp_path))
    assert os.listdir(tmp_path) == cached
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    other = chat_tokenizer()
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    own.encode(r, Render(other), 40, 8, "error", str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2        # another template: another entry


def test_sources_mix_by_weight(files):
    text = f"{files['jsonl']}:weight=3,{files['json']}:weight=1"
    mixed = own.load_records(text, "data.prompts", "prompt", KEYS, seed=0)
    from_jsonl = sum(isinstance(p, list) for p in mixed.prompts)
    assert len(mixed) == 2 * len(QUESTIONS) and from_jsonl == 150    # 3/4 of 200
    assert mixed.columns["level"].count(None) == 50                  # a column of one source


# ---------------------------------------------------------------------------------------------
# reward functions

def batch(n=4):
    prompts = [user(q) for q, _ in QUESTIONS[:n]]
    return ({"prompts": prompts, "completions": [assistant(a) for _, a in QUESTIONS[:n]],
             "completion_ids": [[1]] * n, "truncated": [False] * n,
             "answer": [a for _, a in QUESTIONS[:n]]},
            [f"prompts.jsonl row {i}" for i in range(n)])


@pytest.mark.parametrize("workers", [1, 3])
def test_reward_functions_are_called_as_trl_calls_them(workers):
    fns, rm_weight = R.load(f"{FNS}:says_answer,{FNS}:async_length,verl:{FNS}:verl_compute_score,"
                            "math_answer", (1.0, 0.5, 2.0, 1.0, 0.25), has_rm=True,
                            response_len=8)
    assert [f.name for f in fns] == ["says_answer", "async_length", "verl_verl_compute_score",
                                     "math_answer"]
    assert [f.weight for f in fns] == [1.0, 0.5, 2.0, 1.0] and rm_weight == 0.25
    inputs, origin = batch()
    inputs["answer"][1] = None
    got = [R.call(f, inputs, origin, workers)[0] for f in fns]
    np.testing.assert_array_equal(got[0], [1, np.nan, 1, 1])      # None: no opinion
    np.testing.assert_allclose(got[1], [len(a) / 10 for a in ("0", "1", "2", "3")])
    np.testing.assert_array_equal(got[2], [1, np.nan, 1, 1])      # no ground truth: None
    np.testing.assert_array_equal(got[3], [1, np.nan, 1, 1])


@pytest.mark.parametrize("name, message", [
    ("short_list", r"returned 3 values for 4 completions \(prompts from prompts.jsonl row 0 on\)"),
    ("not_a_number", r"returned nan for the completion of prompts.jsonl row 3"),
    ("raises", r"raised RuntimeError: the grader is down"),
])
def test_a_failing_reward_function_names_itself_and_the_row(name, message):
    (f,), _ = R.load(f"{FNS}:{name}", (), has_rm=False, response_len=8)
    with pytest.raises(R.RewardError, match=message):
        R.call(f, *batch())


@pytest.mark.parametrize("spec, message", [
    ("nowhere.py:f", r"nowhere.py: no such file"),
    ("no_such_module_xyz:f", r"cannot import no_such_module_xyz \(ModuleNotFoundError"),
    (f"{FNS}:missing", r"has no function 'missing'"),
    (f"{FNS}:only_prompts", r"must accept completions="),
    ("exact_match", r"'exact_match' is no built-in reward \(math_answer, "),
])
def test_a_reward_function_that_cannot_load_is_one_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        R.load(spec, (), has_rm=False, response_len=8)


def test_weights_and_columns_are_checked():
    with pytest.raises(ConfigError, match=r"3 weights for 1 reward functions; give 1"):
        R.load("math_answer", (1, 2, 3), has_rm=False, response_len=8)
    fns, _ = R.load(f"{FNS}:needs_difficulty", (), has_rm=False, response_len=8)
    with pytest.raises(ConfigError, match=r"needs the column\(s\) \['difficulty'\], which the "
                                            r"prompts lacks; it has \['answer'\]"):
        R.check_columns(fns, {"answer"}, "the prompts")


# ---------------------------------------------------------------------------------------------
# runs

@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory, tokenizer):
    """An HF folder with a tiny GPT-NeoX (random weights) and the chat tokenizer: what
    `pretrained_sft=` points at."""
    cfg = M.ModelConfig(family="gpt_neox", vocab_size=384, d_model=32, n_layers=1, n_heads=4,
                        d_ff=64, max_len=64, rotary_pct=0.5)
    path = tmp_path_factory.mktemp("sft_folder") / "hf"
    hf.save_pretrained(M.init_params(cfg, jax.random.key(0)), cfg, str(path), tokenizer=tokenizer)
    return str(path)


def dataset_args(files, sft_folder, out_dir, *extra):
    """The issue's command: `make train ARGS="task=dataset data.prompts=... reward_fns=...
    stages=rl pretrained_sft=..."` on the default experiment, made small."""
    return ["exp=toy", "task=dataset", f"out_dir={out_dir}", "stages=rl",
            f"pretrained_sft={sft_folder}", f"data.prompts={files['jsonl']}",
            f"reward_fns={FNS}:says_answer,final_answer_format", "reward_weights=1,0.5",
            "data.prompt_len=32", "data.response_len=6", "eval_prompts=8", "log_every=1",
            "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1", "rl.iterations=3",
            "rl.prompts_per_iter=8", "rl.epochs=1", "rl.eval_every=2",
            "checkpoint.every_steps=1", "checkpoint.every_minutes=0", *extra]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("algo", ["p3o", "grpo", "ppo"])
def test_rl_from_a_pretrained_policy_with_reward_functions_only(files, sft_folder, tmp_path,
                                                               algo, capsys):
    out = tmp_path / algo
    assert main(dataset_args(files, sft_folder, out, f"algo={algo}")) == 0
    err = capsys.readouterr().err
    assert "stages: " not in err or "rm" not in err.split("stages:")[1].split("\n")[0] or \
        "left out" in err
    assert not os.path.exists(out / "rm") and not os.path.exists(out / "ckpt" / "rm")
    rows = read_metrics(out)
    rl = [r for r in rows if r["stage"] == f"rl:{algo}"]
    assert len(rl) == 3 and "rm_reward" not in rl[0]
    for r in rl:   # the reward is the weighted sum of its components
        assert r["reward"] == pytest.approx(r["reward/says_answer"]
                                            + 0.5 * r["reward/final_answer_format"], abs=1e-5)
        assert r["time_reward/says_answer"] >= 0
    evals = [r for r in rows if r["stage"] == f"eval:{algo}"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    summary = json.load(open(out / "summary.json"))
    rows = summary["rows"]
    assert [r["policy"] for r in rows] == ["sft", algo]
    for r in rows:
        assert {"reward", "says_answer", "final_answer_format", "kl_k1", "win_reward"} <= set(r)
        assert "says_answer_acc" in r and "rm" not in r
        assert_recomputed(r, eval_records(out, summary, r["policy"]), files)
    assert rows[0]["kl_k1"] == 0.0


def eval_records(out, summary: dict, policy: str) -> list[dict]:
    """The per-prompt records of `policy`'s final evaluation, from the file summary.json names."""
    assert summary["eval_records"][policy] == f"eval_{policy}.jsonl"
    with open(out / summary["eval_records"][policy]) as f:
        return [json.loads(line) for line in f]


def assert_recomputed(row: dict, records: list[dict], files) -> None:
    """The final table's row of a policy is the means of its per-prompt records: one record
    per held-out prompt, with its row (among the held-out records), origin (the file's row),
    prompt and response texts."""
    assert [r["index"] for r in records] == list(range(8))
    assert len({r["row"] for r in records}) == len({r["origin"] for r in records}) == 8
    for r in records:
        path, _, line = r["origin"].rpartition(" row ")
        assert path == files["jsonl"] and QUESTIONS[int(line)][0] in r["prompt"], r
        assert isinstance(r["response"], str)
    says = np.array([r["rewards"]["says_answer"] for r in records
                     if r["rewards"]["says_answer"] is not None])   # None: no opinion
    assert row["says_answer_acc"] == pytest.approx(np.mean(says == 1))
    assert row["says_answer"] == pytest.approx(np.mean(says))
    for k in ("reward", "kl_k1", "kl_k3", "length"):
        assert row[k] == pytest.approx(np.mean([r[k] for r in records])), k
    fmt = [r["rewards"]["final_answer_format"] for r in records]
    assert row["final_answer_format"] == pytest.approx(np.mean(fmt))


@pytest.fixture(scope="module")
def smollm2_class_folder(tmp_path_factory, tokenizer):
    """A SmolLM2-class chat model as an HF folder: Llama family, GQA, tied embeddings, the
    ChatML tokenizer whose `<|im_end|>` ends a turn, random weights."""
    cfg = M.ModelConfig(family="llama", vocab_size=384, d_model=32, n_layers=1, n_heads=4,
                        n_kv_heads=2, d_ff=64, max_len=64, tie_embeddings=True)
    path = tmp_path_factory.mktemp("smollm2_class") / "hf"
    hf.save_pretrained(M.init_params(cfg, jax.random.key(0)), cfg, str(path), tokenizer=tokenizer,
                       eos_ids=(tokenizer.eos_token_id,))
    return str(path)


def test_a_verl_dataset_with_verl_trl_and_built_in_rewards(smollm2_class_folder, tmp_path,
                                                           verl_path):
    """The issue's done-when: verl's parquet layout end to end on a SmolLM2-class chat model,
    verl's own default_compute_score (its GSM8K scorer) through `verl:`, TRL's own
    accuracy_reward (math-verify) reading `solution` from reward_model.ground_truth
    (data.reward_columns), math_answer reading it through data.answer_key, a verl function
    whose dict has extras (logged as reward/<name>/<extra>), each logged; GRPO with the
    responses cut at response_len out of the loss."""
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(QUESTIONS)), path)
    out = tmp_path / "run"
    fns = (f"math_answer,verl:verl.utils.reward_score:default_compute_score,"
           f"trl.rewards:accuracy_reward,verl:{FNS}:verl_compute_score")
    assert main(dataset_args({"jsonl": str(path)}, smollm2_class_folder, out, f"reward_fns={fns}",
                             "reward_weights=", "data.answer_key=reward_model.ground_truth",
                             'data.reward_columns={"solution": "reward_model.ground_truth"}',
                             "algo=grpo", "rl.mask_truncated=true", "rl.eval_every=0")) == 0
    rl = [r for r in read_metrics(out) if r["stage"] == "rl:grpo"]
    assert len(rl) == 3
    parts = ("math_answer", "verl_default_compute_score", "accuracy_reward",
             "verl_verl_compute_score")
    for r in rl:
        assert r["reward"] == pytest.approx(sum(r[f"reward/{p}"] for p in parts), abs=1e-5)
        assert 0 <= r["reward/verl_verl_compute_score/acc"] <= 1
        assert r["truncated_frac"] > 0.5   # a random policy seldom ends in 6 tokens
        if r["truncated_frac"] == 1:       # every response out of the loss
            assert r["grad_norm"] == 0
    summary = json.load(open(out / "summary.json"))["rows"]
    assert {"math_answer_acc", "accuracy_reward_acc", "verl_verl_compute_score/acc"} <= set(
        summary[1])
    records = [json.loads(line) for line in open(out / "eval_grpo.jsonl")]
    for r in records:       # the functions saw clean assistant text: no template, no specials
        assert "<|im_" not in r["response"] and set(parts) <= set(r["rewards"])


FLAKY = """import os
def flaky(prompts, completions, **_):
    counter = os.environ["FLAKY_COUNTER"]
    calls = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(calls + 1))
    if calls >= 2 and os.path.exists(os.environ["FLAKY_BROKEN"]):
        raise ValueError("bad grader")
    return [1.0] * len(completions)
"""


def test_a_reward_function_failing_mid_run_keeps_the_checkpoint_and_resumes(
        files, sft_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "broken").touch()
    monkeypatch.setenv("FLAKY_COUNTER", str(tmp_path / "calls"))
    monkeypatch.setenv("FLAKY_BROKEN", str(tmp_path / "broken"))
    args = dataset_args(files, sft_folder, tmp_path / "run", f"reward_fns={tmp_path}/flaky.py:flaky",
                        "reward_weights=", "rl.eval_every=0")
    assert main(args) == 3                    # iteration 2's call raises
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: reward function {tmp_path}/flaky.py:flaky raised ValueError: bad "
                      f"grader (on the batch of prompts from {files['jsonl']} row "
                      + errors[0].rsplit(" row ", 1)[1]] and "Traceback" not in err
    ckpts = tmp_path / "run" / "ckpt" / "p3o"
    assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [1, 2]
    os.remove(tmp_path / "broken")            # fixed: the same command continues
    assert main(args) == 0
    assert "rl: resuming at step 2 of 3" in capsys.readouterr().err


DYING = """import os
def dying(completions, answer, **_):
    counter = os.environ["DYING_COUNTER"]
    calls = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(calls + 1))
    if calls == 2 and os.environ.get("DYING") == "1":
        os._exit(1)                   # the server process dies on the batch of iteration 2
    return [float(a is not None and str(a) in text[-1]["content"])
            for text, a in zip(completions, answer)]
"""


def test_a_run_scored_by_a_reward_server_process_stops_when_it_dies_and_resumes(
        files, sft_folder, tmp_path, capsys):
    """reward_fns=http://...: the run scored by `python -m p3o_jax.cli.reward_server` in a
    process of its own, its functions' values logged from the server's extra_logs; the server
    dying mid-run stops the run with one line (exit 3) and a checkpoint; restarted, the same
    command resumes."""
    (tmp_path / "dying.py").write_text(DYING)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start(dying: bool):
        env = dict(os.environ, DYING_COUNTER=str(tmp_path / "calls"), DYING=str(int(dying)))
        proc = subprocess.Popen([sys.executable, "-m", "p3o_jax.cli.reward_server",
                                 f"{tmp_path}/dying.py:dying", f"port={port}"], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("serving dying on"), proc.wait()
        return proc, f"http://127.0.0.1:{port}/score"

    server, url = start(dying=True)
    args = lambda url: dataset_args(files, sft_folder, tmp_path / "run", f"reward_fns={url}",
                                    "reward_weights=", "rl.eval_every=0",
                                    "reward_remote.retries=1")
    try:
        assert main(args(url)) == 3
        assert server.wait(timeout=30) == 1
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert errors[0].startswith(f"error: reward function {url} raised ServerFailed: {url} "
                                    f"failed after 2 attempt(s): "), errors
        ckpts = tmp_path / "run" / "ckpt" / "p3o"
        assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [1, 2]
        server, url = start(dying=False)          # back (a run's reward_fns are its own)
        assert main(args(url)) == 0
        assert "rl: resuming at step 2 of 3" in capsys.readouterr().err
    finally:
        server.terminate()
        server.wait(timeout=30)
    rl = [r for r in read_metrics(tmp_path / "run") if r["stage"] == "rl:p3o"]
    assert len(rl) == 3
    for r in rl:
        served = {k: v for k, v in r.items() if k.startswith("reward/remote_127_0_0_1_")}
        assert len(served) == 2, r.keys()      # the server's reward and its function's values
        total = next(v for k, v in served.items() if not k.endswith("/dying"))
        assert total == pytest.approx(r["reward"]) == pytest.approx(
            next(v for k, v in served.items() if k.endswith("/dying")))


SLOW = """import json, os, time
def slow(completions, trainer_state, **_):
    it, log = trainer_state.global_step, os.environ["SLOW_LOG"]
    start = time.time()
    time.sleep(1.0)                            # a verifier that takes seconds per batch
    def logged():                              # the learner's finished iterations
        with open(os.environ["SLOW_METRICS"]) as f:
            return {r["step"] for r in map(json.loads, f) if r["stage"] == "rl:p3o"}
    waited = 0 < it < trainer_state.max_steps  # batch `it` of the RL loop, not an evaluation
    while waited and it - 1 not in logged() and time.time() - start < 40:
        time.sleep(0.05)
    with open(log, "a") as f:
        f.write(json.dumps({"it": it, "waited": waited, "seen": waited and it - 1 in logged(),
                            "s": time.time() - start}) + "\\n")
    return [0.5] * len(completions)
"""


def test_a_slow_reward_server_is_waited_on_beside_the_learner(files, sft_folder, tmp_path):
    """rl.max_staleness=1 with a reward server process whose function takes seconds: batch
    i + 1's request is in flight while the learner finishes iteration i. The served function
    holds each RL batch's answer until the learner has logged the iteration before it; a loop
    that waited for batch i + 1's rewards before finishing iteration i would hold it for 40 s
    (recorded as not seen) and the request would time out."""
    (tmp_path / "slow.py").write_text(SLOW)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = dict(os.environ, SLOW_LOG=str(tmp_path / "calls.jsonl"),
               SLOW_METRICS=str(out / "metrics.jsonl"))
    server = subprocess.Popen([sys.executable, "-m", "p3o_jax.cli.reward_server",
                               f"{tmp_path}/slow.py:slow", f"port={port}"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith("serving slow on"), server.wait()
        assert main(dataset_args(files, sft_folder, out, f"reward_fns=http://127.0.0.1:{port}/score",
                                 "reward_weights=", "rl.eval_every=0", "rl.max_staleness=1",
                                 "reward_remote.timeout_s=50", "reward_remote.retries=0")) == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl")]
    rl = [c for c in calls if c["waited"]]
    assert sorted(c["it"] for c in rl) == [1, 2], calls      # batch 0 has no iteration before it
    assert all(c["seen"] and c["s"] < 40 for c in rl), calls
    rows = [r for r in read_metrics(out) if r["stage"] == "rl:p3o"]
    assert [r["staleness"] for r in rows] == [0, 1, 1]
    assert all(r["reward"] == pytest.approx(0.5) for r in rows)


FULL_DISK = """import errno, os
def full_disk(prompts, completions, **_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
"""


def test_a_reward_functions_oserror_is_its_own_failure(files, sft_folder, tmp_path, capsys):
    """A reward function raising OSError(ENOSPC) stops the run as the reward function's
    failure (exit 3, its one line), not as a failed write of the run (exit 74)."""
    (tmp_path / "full.py").write_text(FULL_DISK)
    args = dataset_args(files, sft_folder, tmp_path / "run", f"reward_fns={tmp_path}/full.py:full_disk",
                        "reward_weights=", "rl.eval_every=0")
    assert main(args) == 3
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert f"{tmp_path}/full.py:full_disk raised OSError" in errors[0], errors
    assert "No space left on device" in errors[0] and "writing" not in errors[0], errors


@pytest.mark.parametrize("reader", ["datasets.load_dataset", "own.read_source"])
def test_a_data_read_that_fails_is_a_data_error(files, sft_folder, tmp_path, capsys, monkeypatch,
                                                reader):
    """An I/O error reading the data (EIO, from the datasets library or from our reader)
    stops the run as a data error (exit 2, one line naming the file), not as a failed write
    (exit 74), and before anything is written."""
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), files["jsonl"])
    module, name = reader.split(".")
    monkeypatch.setattr({"datasets": datasets, "own": own}[module], name, broken)
    assert main(dataset_args(files, sft_folder, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert files["jsonl"] in errors[0] and "Input/output error" in errors[0], errors
    assert not os.path.exists(tmp_path / "run" / "ckpt")


BAD = {
    "missing_file": ("data.prompts={d}/nope.jsonl",
                     r"config key 'data.prompts': no such file or folder: {d}/nope.jsonl"),
    "missing_column": ("data.prompt_key=question",
                       r"no column\(s\) question or messages or chosen\+rejected for prompt rows; "
                       r"it has \['answer', 'level', 'prompt'\]"),
    "wrong_type": ("data.prompts={d}/bad_type.jsonl",
                   r"{d}/bad_type.jsonl: row 1: prompt must be a string or a conversation, got int"),
    "no_user_turn": ("data.prompts={d}/no_user.jsonl",
                     r"{d}/no_user.jsonl: row 0: the prompt conversation must end with a user turn, "
                     r"not 'assistant'"),
    "no_reward": ("reward_fns=", r"config key 'reward_fns': no reward: set reward_fns"),
    "bad_signature": ("reward_fns={fns}:only_prompts reward_weights=", r"must accept completions="),
    "missing_reward_column": ("reward_fns={fns}:needs_difficulty reward_weights=",
                              r"needs the column\(s\) \['difficulty'\]"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_before_any_compute(files, sft_folder, tmp_path, capsys, case):
    d = os.path.dirname(files["jsonl"])
    write_jsonl(os.path.join(d, "bad_type.jsonl"), [{"prompt": "fine"}, {"prompt": 3}])
    write_jsonl(os.path.join(d, "no_user.jsonl"), [{"prompt": user("hi") + assistant("hello")}])
    arg, message = BAD[case]
    args = dataset_args(files, sft_folder, tmp_path / "run", *arg.format(d=d, fns=FNS).split())
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([l for l in err if l.startswith("error:")]) == 1 and "Traceback" not in err
    assert re.search(message.format(d=re.escape(d)), err[-1]), err[-1]
    assert not os.path.exists(tmp_path / "run" / "ckpt")


@pytest.mark.parametrize("staleness", [0, 1])
def test_toy_trained_by_a_reward_function_equal_to_its_gold(tmp_path, monkeypatch, staleness):
    """The plumbing is exact (the reward each response gets is its gold reward) and RL on it
    improves the gold reward as the gold-scored task should. At `rl.max_staleness=1` too,
    where each iteration's reward function is called from the thread beside the previous
    iteration's update (all but the first)."""
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("TOY_GOLD_LOG", str(log))
    cfg = config_args.from_args(["exp=toy", f"out_dir={tmp_path}", "stages=sft,rl",
                       f"reward_fns={FNS}:toy_gold_logged", "eval_prompts=128", "log_every=50",
                       f"rl.max_staleness={staleness}",
                       "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "policy.d_model=32",
                       "policy.n_layers=1", "policy.d_ff=64", "sft.steps=60", "sft.batch_size=32",
                       "sft.optim.lr=1e-2", "rl.iterations=12", "rl.prompts_per_iter=32",
                       "rl.epochs=2", "rl.minibatches=2", "rl.beta=0.01", "rl.optim.lr=3e-3",
                       "rl.optim.warmup_steps=0", "p3o.delta_norm=batch_std"])
    rows = {r["policy"]: r for r in run_experiment(cfg)["rows"]}
    for r in rows.values():
        assert r["reward"] == pytest.approx(r["gold"]) == pytest.approx(r["toy_gold_logged"])
        assert r["reward_se"] == pytest.approx(r["gold_se"])
    rl_calls = [line.split() for line in log.read_text().splitlines()][:12]   # then evaluation
    assert [int(step) for _, step in rl_calls] == list(range(12))
    beside = [thread.startswith("host-rewards") for thread, _ in rl_calls]
    assert beside == [False] + [bool(staleness)] * 11, rl_calls
    assert rows["p3o"]["gold"] > rows["sft"]["gold"]
    assert rows["p3o"]["win_gold"] - 0.5 > 2 * rows["p3o"]["win_gold_se"], rows
    assert not os.path.exists(tmp_path / "rm")


def test_the_smollm2_experiment_runs_on_a_local_model(sft_folder, tmp_path):
    """`make train EXP=smollm2` as committed (its prompt files, math_answer, top layers, held-
    out eval, the samples kept in summary.json), with a tiny local model for SmolLM2."""
    out = tmp_path / "smollm2"
    assert main(["exp=smollm2", f"pretrained_sft={sft_folder}", f"out_dir={out}",
                 "rl.train_top_layers=1", "rl.iterations=2", "rl.prompts_per_iter=8",
                 "rl.eval_every=2", "eval_prompts=8", "mesh.data=2", "mesh.fsdp=4"]) == 0
    rows = read_metrics(out)
    rl = [r for r in rows if r["stage"] == "rl:p3o"]
    assert len(rl) == 2 and rl[0]["reward"] == rl[0]["reward/math_answer"]
    evals = [r for r in rows if r["stage"] == "eval:p3o"]
    assert [r["step"] for r in evals] == [0, 2] and 0 <= evals[0]["math_answer_acc"] <= 1
    summary = json.load(open(out / "summary.json"))
    assert set(summary["samples"]) == {"sft", "p3o"}
    assert "Answer with the number only." in summary["samples"]["sft"]
