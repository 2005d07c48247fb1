"""Methods compared from one starting policy on a task scored by reward functions: no SFT or
reward-model stage to share, every method at the experiment's `rl.beta` (the frontier's
`METHODS`), over seeds; held-out accuracy and reward against iterations.

    python -m p3o_jax.cli.compare exp=smollm2 [methods=P3O-V2,GRPO,RLOO,PPO] [seeds=0,1]
                                  [name=smollm2] [results=experiments/results] [key=value ...]

Each run has its own folder, `<out_dir>-compare/seed<S>/<method>`, and resumes there after a
kill (the same command again); a finished run (its summary.json written) is only read
(`run=false`: only the finished runs are read, none started). Then:
    <results>/<name>.jsonl  every evaluation of every run (method, seed, step, the eval row)
                            and each run's wall time (rows with "seconds")
    <results>/<name>.png    held-out accuracy (the first 0/1 reward function) and KL against
                            iterations, mean over seeds with +- SE
    <results>/<name>.md     the table before/after (SE across seeds, and over the eval prompts),
                            seconds per iteration, total minutes, and three held-out answers per
                            method before and after
    <results>/<name>/seed<S>-<method>/  each run's summary.json and per-prompt final evaluation
                            (eval_<policy>.jsonl: prompt, response, each reward), from which
                            the table's before and after can be recomputed
"""
from __future__ import annotations

import dataclasses
import json
import glob
import os
import shutil
import sys
from typing import Annotated

import jax
import numpy as np

from p3o_jax.checks import NonNegative, OneOf, Pattern
from p3o_jax.cli.frontier import (METHODS, keep_compiled, load_average, overridden,
                                  write_jsonl, write_report)
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.checks import ConfigError
from p3o_jax.config import ExperimentConfig
from p3o_jax.config_args import from_args, tool_args
from p3o_jax.evaluate import mean_se, mean_se_over_runs
from p3o_jax.logger import format_table
from p3o_jax.pipeline import eval_file, run_experiment


@dataclasses.dataclass(frozen=True)
class CompareArgs:
    """This command's own keys (every other key overrides the experiment's config)."""
    methods: Annotated[tuple[str, ...], OneOf(*METHODS)] = ("P3O-V2", "GRPO", "RLOO", "PPO")
    seeds: Annotated[tuple[int, ...], NonNegative] = (0, 1)
    evals: Annotated[int, NonNegative] = 4  # evaluations along each run, besides its start
    name: Annotated[str, Pattern(r"[\w.-]*", "a file name")] = ""  # "": the experiment's name
    results: str = "experiments/results"
    run: bool = True                # false: report the finished runs only (a sweep under way)


def run_folder(cfg: ExperimentConfig, seed: int, method: str) -> str:
    return os.path.join(f"{cfg.out_dir.rstrip('/')}-compare", f"seed{seed}", method)


def run_method(cfg: ExperimentConfig, seed: int, method: str, evals: int) -> str:
    """One method's run of `seed` (resumed if it was stopped, skipped if it finished): its
    folder."""
    path = run_folder(cfg, seed, method)
    if not os.path.exists(os.path.join(path, "summary.json")):
        run = overridden(dataclasses.replace(cfg, seed=seed, out_dir=path),
                         METHODS[method](cfg.rl.beta, cfg))
        run = overridden(run, {"rl.eval_every": max(run.rl.iterations // max(evals, 1), 1)})
        run_experiment(run)
        jax.clear_caches()      # each run's programs hold memory maps (see frontier.rl_run)
    return path


def off_policy_stats(rl: list[dict]) -> dict:
    """Means over a run's RL rows of the clip fraction, the importance weights (their mean and
    the share capped) and the sampler gap |log pi_behav - log pi_prox| per token, and the
    largest staleness: what says how far off-policy the run's updates were. Statistics its rows
    lack (a run logged before they were) are left out."""
    clip = "policy_clip_frac" if rl and "policy_clip_frac" in rl[0] else "clip_frac"
    stats = {"clip_frac": (clip, np.mean), "is_weight_mean": ("is_weight_mean", np.mean),
             "is_weight_max": ("is_weight_max", max), "is_capped_frac": ("is_capped_frac", np.mean),
             "logp_gap_mean": ("logp_gap_mean", np.mean), "staleness_max": ("staleness", max)}
    return {name: float(reduce([r[k] for r in rl])) for name, (k, reduce) in stats.items()
            if rl and all(k in r for r in rl)}


def read_run(path: str, method: str, seed: int) -> tuple[list[dict], dict, dict]:
    """A run's eval rows (the last logged at each step), its timing row and its samples."""
    evals, rl = {}, {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            (evals if r["stage"].startswith("eval:") else rl)[r["step"]] = r
    rows = [{"method": method, "seed": seed, "step": step,
             **{k: v for k, v in r.items() if k not in ("stage", "step", "time")}}
            for step, r in sorted(evals.items())]
    stamps = [r["time"] for r in (*evals.values(), *rl.values())]
    per_iter = [r.get("time_generate", 0) + r.get("time_score", 0) + r.get("time_update", 0)
                for step, r in sorted(rl.items()) if step > 0]   # iteration 0 compiles
    timing = {"method": method, "seed": seed, "seconds": max(stamps) - min(stamps),
              "seconds_per_iteration": float(np.mean(per_iter)) if per_iter else None,
              "iterations": len(rl), **off_policy_stats([r for _, r in sorted(rl.items())])}
    with open(os.path.join(path, "summary.json")) as f:
        samples = json.load(f).get("samples", {})
    return rows, timing, samples


def final_scores(path: str, key: str) -> dict[int, float]:
    """A run's final (RL) policy on each eval prompt: `key`'s reward by prompt index, from its
    per-prompt records (`pipeline.eval_file`)."""
    name, = (f for f in glob.glob(os.path.join(path, "eval_*.jsonl"))
             if os.path.basename(f) != eval_file("sft"))
    with open(name) as f:
        return {r["index"]: r["rewards"][key] for r in map(json.loads, f)}


def paired_differences(finals: dict, key: str) -> list[str]:
    """The first method against each other one: the mean difference in `key` on the same eval
    prompts, per seed, then mean ± SE across the seeds both finished (one seed: its SE over
    the prompts, which leaves out how runs vary)."""
    methods = list(dict.fromkeys(m for m, _ in finals))
    first, lines = methods[0], []
    for other in methods[1:]:
        means, ses = [], []
        for seed in sorted({s for m, s in finals if m == first} & {s for m, s in finals
                                                                     if m == other}):
            a, b = finals[first, seed], finals[other, seed]
            mean, se = mean_se([a[i] - b[i] for i in sorted(a)])
            means.append(mean)
            ses.append(se)
        if means:
            mean, se = mean_se_over_runs(means, ses)
            over = (f"across {len(means)} seeds" if len(means) > 1 else
                    f"1 seed, over its {len(finals[first, seed])} prompts")
            ratio = f"{mean / se:+.1f} SE, " if se else ""
            lines.append(f"- {first} − {other}: {mean:+.3f} ± {se:.3f} ({ratio}{over})")
    return lines


def keep_records(path: str, to: str) -> None:
    """A run's summary.json and per-prompt evaluation files (`pipeline.eval_file`) copied to
    `to`, beside the report."""
    os.makedirs(to, exist_ok=True)
    for name in ["summary.json", *map(os.path.basename,
                                      glob.glob(os.path.join(path, "eval_*.jsonl")))]:
        shutil.copyfile(os.path.join(path, name), os.path.join(to, name))


def accuracy_key(records: list[dict]) -> str:
    """The first 0/1 reward function's accuracy column of the eval rows, else "reward"."""
    return next((k[:-4] for k in records[0] if k.endswith("_acc")), "reward")


def table(records: list[dict], timings: list[dict], key: str) -> list[dict]:
    """Per method: before (step 0) and after (the last step) means, SE across seeds and the
    mean SE over prompts, the final KL, seconds per iteration and per run."""
    out = []
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        start = [r for r in rs if r["step"] == 0]
        last = max(r["step"] for r in rs)
        end = [r for r in rs if r["step"] == last]
        row = {"method": method, "seeds": len(end), "iterations": last}
        for when, group in (("before", start), ("after", end)):
            for k in dict.fromkeys((key, "reward")):
                values = [r.get(k + "_acc", r[k]) for r in group]
                mean, se = mean_se_over_runs(values, [r[k + "_se"] for r in group])
                row[f"{k} {when}"] = f"{mean:.3f} ± {se:.3f}"
                row[f"{k} {when} (prompts)"] = f"± {np.mean([r[k + '_se'] for r in group]):.3f}"
        mean, se = mean_se_over_runs([r["kl_k1"] for r in end], [r["kl_k1_se"] for r in end])
        row["KL (k1)"] = f"{mean:.2f} ± {se:.2f}"
        ts = [t for t in timings if t["method"] == method]
        for k, name, digits in (("clip_frac", "clip frac", 3), ("is_weight_mean", "IS weight", 3),
                                ("is_capped_frac", "capped", 4), ("logp_gap_mean", "logp gap", 4)):
            values = [t[k] for t in ts if k in t]
            row[name] = f"{np.mean(values):.{digits}f}" if values else ""
        row["staleness"] = max((int(t["staleness_max"]) for t in ts if "staleness_max" in t),
                               default="")
        row["s / iteration"] = f"{np.mean([t['seconds_per_iteration'] for t in ts]):.1f}"
        row["minutes / run"] = f"{np.mean([t['seconds'] for t in ts]) / 60:.1f}"
        out.append(row)
    return out


def plot(records: list[dict], key: str, path: str) -> None:
    """Held-out accuracy and KL against iterations: mean over seeds, shaded +- SE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in records)):
        color = plt.get_cmap("tab10")(i)
        steps = sorted({r["step"] for r in records if r["method"] == method})
        for ax, k in zip(axes, (key + "_acc" * (key != "reward"), "kl_k1")):
            per = [[r[k] for r in records if r["method"] == method and r["step"] == s]
                   for s in steps]
            mean, se = np.array([mean_se(v) for v in per]).T
            ax.plot(steps, mean, marker="o", color=color,
                    label=f"{method} ({len(per[-1])} seed{'s' * (len(per[-1]) > 1)})")
            ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.2)
    axes[0].set_ylabel(f"held-out accuracy ({key})")
    axes[1].set_ylabel("KL(π || π_start) on held-out prompts (k1, nats per response)")
    for ax in axes:
        ax.set_xlabel("RL iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(command: str, cfg: ExperimentConfig, records, timings, samples, key: str,
           differences: list[str] = ()) -> str:
    rows = table(records, timings, key)
    columns = list(rows[0])
    text = [f"`{command}` ({sum(t['seconds'] for t in timings) / 60:.0f} minutes of runs on "
            f"{os.cpu_count()} CPU cores; load average at the end {load_average()})", "",
            f"{cfg.eval_prompts} held-out prompts, sampled at temperature "
            f"{cfg.rl.temperature:g}; `{key}` accuracy and the total reward before and after "
            f"RL: mean ± SE across seeds (one seed: over prompts); \"(prompts)\" is the "
            f"mean SE over the eval prompts of one run. KL to the starting policy at the end. "
            f"Clip fraction, importance weight (`rl.rollout_is={cfg.rl.rollout_is}`, cap "
            f"{cfg.rl.rollout_is_cap:g}), the share of weights capped and the sampler gap "
            f"|log pi_behav - log pi_prox| per token: means over the iterations; staleness: "
            f"the most policy versions a batch lagged. "
            f"Seconds per iteration: sampling, scoring and the update, after the first "
            f"(compiling) iteration; minutes per run include the compiles and evaluations.", "",
            format_table(rows, columns), ""]
    if differences:
        text += [f"Held-out `{key}` of the final policies, paired on the same prompts:", "",
                 *differences, ""]
    section = lambda title, body: [f"### {title}", "", "```", body.strip(), "```", ""]
    befores = {by_policy.get("sft") for by_policy in samples.values()}
    shared = befores.pop() if len(befores) == 1 else None   # every method starts from one policy
    if shared:
        text += section("Before RL (the starting policy, every method)", shared)
    for method, by_policy in samples.items():
        for name, text_ in by_policy.items():
            if name != "sft":
                text += section(f"{method}, after", text_)
            elif not shared:
                text += section(f"{method}, before (the starting policy)", text_)
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, own=CompareArgs()))
        return 0
    try:
        args, rest = tool_args(argv, CompareArgs())
        cfg = from_args(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keep_compiled(cfg.out_dir.rstrip("/") + "-compare/jax_cache")
    records, timings, samples, paths = [], [], {}, {}
    for seed in args.seeds:
        for method in args.methods:
            path = run_folder(cfg, seed, method)
            if args.run:
                run_method(cfg, seed, method, args.evals)
            elif not os.path.exists(os.path.join(path, "summary.json")):
                continue
            rows, timing, text = read_run(path, method, seed)
            keep_records(path, os.path.join(args.results, args.name or cfg.name,
                                            f"seed{seed}-{method}"))
            records += rows
            timings.append(timing)
            paths[method, seed] = path
            if seed == args.seeds[0]:
                samples[method] = text
    name = args.name or cfg.name
    os.makedirs(args.results, exist_ok=True)
    key = accuracy_key(records)
    write_jsonl(os.path.join(args.results, f"{name}.jsonl"), records + timings)
    plot(records, key, os.path.join(args.results, f"{name}.png"))
    command = "python -m p3o_jax.cli.compare " + " ".join(argv)
    finals = {run: final_scores(path, key) for run, path in paths.items()}
    write_report(os.path.join(args.results, f"{name}.md"),
                 report(command, cfg, records, timings, samples, key,
                        paired_differences(finals, key)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
