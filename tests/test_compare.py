"""p3o_jax.cli.compare on run folders written here (metrics.jsonl and summary.json as a run
leaves them): finished runs are read, not run again; the table's before/after means and SEs
(across seeds, over prompts), the timings, the plot and the samples."""
import json
import os

import numpy as np
import pytest

from p3o_jax.cli import compare

ACC = {("P3O-V2", 0): (0.2, 0.6), ("P3O-V2", 1): (0.3, 0.8),
       ("GRPO", 0): (0.2, 0.5), ("GRPO", 1): (0.3, 0.5)}
PROMPT_OFFSETS = (-0.1, 0.0, 0.1)     # a run's final reward on each eval prompt: acc + offset


def write_run(path, method, seed, before, after, sample_before=None):
    os.makedirs(path)
    rows = []
    for step, acc in ((0, before), (2, (before + after) / 2), (4, after)):
        se = float(np.sqrt(acc * (1 - acc) / 100))
        rows.append({"stage": "eval:x", "step": step, "time": 100.0 + 10 * step, "reward": acc,
                     "reward_se": se, "kl_k1": 0.1 * step, "kl_k1_se": 0.01,
                     "math_answer": acc, "math_answer_se": se, "math_answer_acc": acc})
    for step in range(4):
        rows.append({"stage": "rl:x", "step": step, "time": 101.0 + 10 * step,
                     "time_generate": 1.0 + 9 * (step == 0), "time_score": 0.5,
                     "time_update": 0.5, "policy_clip_frac": 0.1 * step + seed,
                     "is_weight_mean": 1.0, "is_weight_max": 1.5 + step, "is_capped_frac": 0.0,
                     "logp_gap_mean": 0.01 * step, "staleness": min(step, 2)})
    rows.append(dict(rows[-1], time_update=99.0))   # a resumed run logs a step again: the last
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"rows": [], "samples": {"sft": sample_before or f"{method} before",
                                           "x": f"{method} after"}}, f)
    with open(os.path.join(path, "eval_x.jsonl"), "w") as f:   # the final policy's records
        f.writelines(json.dumps({"index": i, "rewards": {"math_answer": after + d}}) + "\n"
                     for i, d in enumerate(PROMPT_OFFSETS))
    with open(os.path.join(path, "eval_sft.jsonl"), "w") as f:  # the starting policy's
        f.writelines(json.dumps({"index": i, "rewards": {"math_answer": before}}) + "\n"
                     for i in range(len(PROMPT_OFFSETS)))


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "runs" / "exp"
    for (method, seed), (before, after) in ACC.items():
        write_run(f"{out}-compare/seed{seed}/{method}", method, seed, before, after)
    return out


def test_finished_runs_are_read_not_run(finished, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_experiment", lambda cfg: pytest.fail("ran again"))
    results = tmp_path / "results"
    assert compare.main(["exp=arithmetic", f"out_dir={finished}", "methods=P3O-V2,GRPO",
                         "seeds=0,1", f"results={results}", "name=demo"]) == 0
    records = [json.loads(line) for line in open(results / "demo.jsonl")]
    evals = [r for r in records if "step" in r]
    timings = [r for r in records if "seconds" in r]
    assert len(evals) == 4 * 3 and len(timings) == 4
    # each step once (the resumed step's last row), iteration 0 (compiling) left out
    assert timings[0]["seconds_per_iteration"] == pytest.approx((2 * 2 + 99 + 1.5) / 3)
    assert timings[0]["seconds"] == pytest.approx(140 - 100)   # first row to last
    assert (results / "demo.png").stat().st_size > 10_000
    text = open(results / "demo.md").read()
    row = next(line for line in text.splitlines() if line.startswith("| P3O-V2"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # accuracy after: mean over the seeds, SE across them (std ddof=1 / sqrt 2 = 0.1)
    assert cells[:3] == ["P3O-V2", "2", "4"]
    assert "0.700 ± 0.100" in cells and "0.250 ± 0.050" in cells
    se_prompts = np.mean([np.sqrt(a * (1 - a) / 100) for a in (0.6, 0.8)])
    assert f"± {se_prompts:.3f}" in cells
    assert "0.40 ± 0.00" in cells                                          # KL at the end
    # off-policy statistics: means over a run's iterations (the resumed step once), over seeds
    stats = dict(zip([c.strip() for c in text.splitlines()[4].strip("|").split("|")], cells))
    assert stats["clip frac"] == "0.650" and stats["logp gap"] == "0.0150"
    assert stats["staleness"] == "2" and stats["IS weight"] == "1.000"
    assert timings[0]["is_weight_max"] == 4.5
    # P3O-V2 against GRPO on the same prompts: 0.1 and 0.3 per seed, so 0.2 ± 0.1 across them
    assert "- P3O-V2 − GRPO: +0.200 ± 0.100 (+2.0 SE, across 2 seeds)" in text
    assert "P3O-V2 before" in text and "GRPO after" in text
    for (method, seed), (_, after) in ACC.items():  # each run's per-prompt records kept
        kept = results / "demo" / f"seed{seed}-{method}"
        first = json.loads(open(kept / "eval_x.jsonl").readline())
        assert first["rewards"]["math_answer"] == pytest.approx(after + PROMPT_OFFSETS[0])
        assert (kept / "summary.json").exists()


def test_an_unfinished_run_is_run(finished, tmp_path, monkeypatch):
    os.remove(f"{finished}-compare/seed1/GRPO/summary.json")
    ran = []

    def run(cfg):
        ran.append(cfg)
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump({"rows": [], "samples": {}}, f)

    monkeypatch.setattr(compare, "run_experiment", run)
    assert compare.main(["exp=arithmetic", f"out_dir={finished}", "methods=P3O-V2,GRPO",
                         "seeds=0,1", f"results={tmp_path / 'r'}", "evals=2"]) == 0
    (cfg,) = ran
    assert (cfg.algo, cfg.seed, cfg.rl.eval_every) == ("grpo", 1, cfg.rl.iterations // 2)
    assert cfg.out_dir == f"{finished}-compare/seed1/GRPO"
    assert os.path.exists(tmp_path / "r" / "arithmetic.md")


def test_run_false_reports_the_finished_runs_only(finished, tmp_path, monkeypatch):
    os.remove(f"{finished}-compare/seed1/GRPO/summary.json")
    monkeypatch.setattr(compare, "run_experiment", lambda cfg: pytest.fail("ran"))
    assert compare.main(["exp=arithmetic", f"out_dir={finished}", "methods=P3O-V2,GRPO",
                         "seeds=0,1", f"results={tmp_path}", "run=false"]) == 0
    rows = [line for line in open(tmp_path / "arithmetic.md") if line.startswith("| ")]
    assert [r.split("|")[1:3] for r in rows[1:]] == [[" P3O-V2 ", " 2 "], [" GRPO ", " 1 "]]


def test_bad_method_is_one_line(capsys):
    assert compare.main(["exp=arithmetic", "methods=P3O-V3"]) == 2
    assert "methods" in capsys.readouterr().err


def test_one_starting_policy_is_shown_once(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "exp"
    for method in ("P3O-V2", "GRPO"):
        write_run(f"{out}-compare/seed0/{method}", method, 0, 0.2, 0.6,
                  sample_before="<start sample>")
    monkeypatch.setattr(compare, "run_experiment", lambda cfg: pytest.fail("ran again"))
    assert compare.main(["exp=arithmetic", f"out_dir={out}", "methods=P3O-V2,GRPO", "seeds=0",
                         f"results={tmp_path}", "name=demo"]) == 0
    text = open(tmp_path / "demo.md").read()
    assert text.count("<start sample>") == 1 and "every method" in text
    assert "### P3O-V2, after" in text and "### GRPO, after" in text
    assert "P3O-V2, before" not in text
    assert "- P3O-V2 − GRPO: +0.000 ± 0.000 (1 seed, over its 3 prompts)" in text
