"""Where P3O's pairwise trust region can pay: every method in regimes whose rollouts are
reused or stale, with the same importance correction (`rl.rollout_is`, p3o_jax/importance.py).

    python -m p3o_jax.cli.offpolicy [exp=toy] [methods=P3O-V1,P3O-V2,Dr.GRPO,RLOO,PPO]
        [regimes=fresh,reuse,stale2,stale4] [seeds=0,1,2] [results=experiments/results]
        [key=value ...]                                                  (`make offpolicy`)

Regimes (`REGIMES`): `fresh` samples, scores and takes one step on the batch (every ratio is 1,
no clip acts: k = 2 P3O-V2 is then RLOO); `reuse` takes 4 epochs of 4 minibatches on each batch;
`stale2` and `stale4` learn from batches sampled 2 or 4 updates earlier (`rl.max_staleness`),
in 4 minibatch steps each used once, as asynchronous systems split a batch. Per seed, SFT and
the reward model are the KL-reward frontier's (`<out_dir>-frontier/seed<S>`, trained once and
shared); every method x regime is an RL run in `<out_dir>-frontier/seed<S>/offpolicy-<method>-<regime>`,
resumable on its own. All at `rl.beta` 0.1 (the toy's frontier middle), 40 iterations.

Writes `<results>/offpolicy.jsonl` (every evaluation, with the generated tokens and wall
seconds up to it, and one row per run with its per-iteration statistics), `offpolicy.png`
(held-out gold reward against generated tokens and against wall-clock, a panel per regime)
and `offpolicy.md`: the final policies' gold reward, KL, win rate, clip fraction, importance
weights and sampler gap, per regime; and the verdict, each P3O variant against the best other
method of its regime, in standard errors of the difference.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Annotated

import numpy as np

from p3o_jax.checks import ConfigError, NonNegative, OneOf
from p3o_jax.cli.compare import off_policy_stats
from p3o_jax.cli.frontier import (METHODS, keep_compiled, load_average, overridden, rl_run,
                                  train_sft_rm, write_jsonl, write_report)
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.config_args import from_args, tool_args
from p3o_jax.evaluate import mean_se, mean_se_over_runs
from p3o_jax.logger import format_table

REGIMES = {
    "fresh": {"rl.epochs": 1, "rl.minibatches": 1, "rl.max_staleness": 0},
    "reuse": {"rl.epochs": 4, "rl.minibatches": 4, "rl.max_staleness": 0},
    "stale2": {"rl.epochs": 1, "rl.minibatches": 4, "rl.max_staleness": 2},
    "stale4": {"rl.epochs": 1, "rl.minibatches": 4, "rl.max_staleness": 4},
}
CONFIG = ("rl.iterations=40", "eval_prompts=256")   # the sweep's (the command line's win)
P3O = ("P3O-V1", "P3O-V2")


@dataclasses.dataclass(frozen=True)
class OffPolicyArgs:
    """This command's own keys (every other key overrides the experiment's config)."""
    methods: Annotated[tuple[str, ...], OneOf(*METHODS)] = ("P3O-V1", "P3O-V2", "Dr.GRPO",
                                                           "RLOO", "PPO")
    regimes: Annotated[tuple[str, ...], OneOf(*REGIMES)] = tuple(REGIMES)
    seeds: Annotated[tuple[int, ...], NonNegative] = (0, 1, 2)
    beta: Annotated[float, NonNegative] = 0.1
    evals: Annotated[int, NonNegative] = 4     # evaluations along each run, besides its start
    results: str = "experiments/results"


def iteration_walls(rows: list[dict]) -> list[float]:
    """Seconds of each RL iteration from the log's time stamps, an evaluation logged between
    two iterations left out; the first (compiling) iteration counts as the median."""
    stamps = sorted((r["step"], r["stage"].startswith("eval:"), r["time"]) for r in rows)
    rl = {step: t for step, is_eval, t in stamps if not is_eval}
    evals = {step: t for step, is_eval, t in stamps if is_eval}
    walls = [rl[i] - evals.get(i, rl[i - 1]) for i in sorted(rl) if i > 0]
    return [statistics.median(walls) if walls else 0.0] + walls


def run_records(rows: list[dict], method: str, regime: str, seed: int, steps: int,
                cfg) -> tuple[list[dict], dict]:
    """A run's evaluations (each with the response tokens generated and the wall seconds of
    the iterations before it) and its per-run row: means over its iterations of the clip
    fraction, the importance weights, the sampler gap, and the seconds per iteration."""
    rl = sorted((r for r in rows if r["stage"].startswith("rl:")), key=lambda r: r["step"])
    per_batch = cfg.rl.prompts_per_iter * cfg.rl.n_samples
    tokens = np.cumsum([0.0] + [r["response_length"] * per_batch for r in rl])
    seconds = np.cumsum([0.0] + iteration_walls(rows))
    key = dict(method=method, regime=regime, seed=seed)
    evals = [{**key, "step": r["step"], "final": r["step"] == steps,
              "tokens": float(tokens[r["step"]]), "seconds": float(seconds[r["step"]]),
              **{k: v for k, v in r.items() if k not in ("stage", "step", "time")}}
             for r in sorted(rows, key=lambda r: r["step"]) if r["stage"].startswith("eval:")]
    run = {**key, "run": True, **off_policy_stats(rl),
           "seconds_per_iteration": statistics.median(iteration_walls(rows)[1:] or [0.0])}
    return evals, run


def sweep(args: OffPolicyArgs, cfg) -> tuple[list[dict], list[dict]]:
    """Every method x regime x seed (finished runs are only read)."""
    evals, runs = [], []
    for seed in args.seeds:
        base = train_sft_rm(cfg, seed, "frontier")
        for regime in args.regimes:
            for method in args.methods:
                over = {**METHODS[method](args.beta, cfg), **REGIMES[regime],
                        "rl.eval_every": max(cfg.rl.iterations // max(args.evals, 1), 1)}
                run_cfg = overridden(dataclasses.replace(cfg, seed=seed), over)
                rows = rl_run(run_cfg, base, f"offpolicy-{method}-{regime}", {})
                e, r = run_records(rows, method, regime, seed, cfg.rl.iterations, run_cfg)
                evals += e
                runs.append(r)
                print(f"offpolicy: seed {seed} {regime} {method}: gold "
                      f"{e[-1]['gold']:.3f}, KL {e[-1]['kl_k1']:.2f}", file=sys.stderr)
    return evals, runs


def table(evals: list[dict], runs: list[dict]) -> list[dict]:
    """The final policies, per regime and method: mean +- SE across seeds (over prompts
    with one seed) and the runs' statistics."""
    out = []
    for regime in dict.fromkeys(r["regime"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs):
            end = [r for r in evals if r["final"] and (r["regime"], r["method"]) == (regime, method)]
            rs = [r for r in runs if (r["regime"], r["method"]) == (regime, method)]
            if not end:
                continue
            row = {"regime": regime, "method": method, "seeds": len(end)}
            for k in ("gold", "kl_k1", "win_gold"):
                row[k], row[k + "_se"] = mean_se_over_runs([r[k] for r in end],
                                                           [r[k + "_se"] for r in end])
            for k in ("clip_frac", "is_weight_mean", "is_capped_frac", "logp_gap_mean",
                      "seconds_per_iteration"):
                row[k] = float(np.mean([r[k] for r in rs]))
            out.append(row)
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """Per regime, each P3O variant's final gold reward against the best other method's, in
    standard errors of the difference: a win or a loss beyond 2 SE, else a tie."""
    lines = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rs = [r for r in rows if r["regime"] == regime]
        others = [r for r in rs if r["method"] not in P3O]
        if not others:
            continue
        best = max(others, key=lambda r: r["gold"])
        for p in (r for r in rs if r["method"] in P3O):
            diff, se = p["gold"] - best["gold"], float(np.hypot(p["gold_se"], best["gold_se"]))
            z = diff / se if se else float("inf") * np.sign(diff)
            word = "wins" if z > 2 else "loses" if z < -2 else "ties"
            lines.append(f"- **{regime}**: {p['method']} {word} against {best['method']}, the "
                         f"best other method: gold {p['gold']:.3f} vs {best['gold']:.3f}, "
                         f"difference {diff:+.3f} ± {se:.3f} ({z:+.1f} SE); KL "
                         f"{p['kl_k1']:.2f} vs {best['kl_k1']:.2f}")
    return lines


def markdown(rows: list[dict]) -> str:
    cell = lambda r, k: f"{r[k]:.3f} ± {r[k + '_se']:.3f}"
    return format_table([{
        "regime": r["regime"], "method": r["method"], "seeds": r["seeds"],
        "gold": cell(r, "gold"), "KL (k1)": cell(r, "kl_k1"), "gold win vs SFT": cell(r, "win_gold"),
        "clip frac": f"{r['clip_frac']:.3f}", "IS weight": f"{r['is_weight_mean']:.3f}",
        "capped": f"{r['is_capped_frac']:.4f}", "logp gap": f"{r['logp_gap_mean']:.4f}",
        "s / it": f"{r['seconds_per_iteration']:.2f}"} for r in rows],
        ["regime", "method", "seeds", "gold", "KL (k1)", "gold win vs SFT", "clip frac",
         "IS weight", "capped", "logp gap", "s / it"])


def plot(evals: list[dict], path: str) -> None:
    """Held-out gold reward against generated tokens (top) and wall-clock (bottom), a panel
    per regime: mean over seeds at each evaluation, shaded +- SE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    regimes = list(dict.fromkeys(r["regime"] for r in evals))
    methods = list(dict.fromkeys(r["method"] for r in evals))
    fig, axes = plt.subplots(2, len(regimes), figsize=(4.5 * len(regimes), 8), squeeze=False,
                             sharey=True)
    for col, regime in enumerate(regimes):
        for i, method in enumerate(methods):
            rs = [r for r in evals if (r["regime"], r["method"]) == (regime, method)]
            steps = sorted({r["step"] for r in rs})
            at = [[r for r in rs if r["step"] == s] for s in steps]
            gold, se = np.array([mean_se([r["gold"] for r in g]) for g in at]).T
            for row, x in enumerate(("tokens", "seconds")):
                xs = [np.mean([r[x] for r in g]) for g in at]
                ax = axes[row, col]
                ax.plot(xs, gold, marker="o", color=plt.get_cmap("tab10")(i), label=method)
                ax.fill_between(xs, gold - se, gold + se, color=plt.get_cmap("tab10")(i),
                                alpha=0.15)
        axes[0, col].set_title(regime)
        axes[0, col].set_xlabel("response tokens generated")
        axes[1, col].set_xlabel("wall-clock seconds of RL iterations")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out gold reward")
    axes[1, 0].set_ylabel("held-out gold reward")
    axes[0, 0].legend(fontsize=8)
    seeds = len({r["seed"] for r in evals})
    fig.suptitle(f"Off-policy regimes: mean over {seeds} seed(s), ± SE")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, own=OffPolicyArgs()))
        return 0
    try:
        args, rest = tool_args(argv, OffPolicyArgs())
        exp = [a for a in rest if a.startswith("exp=")]
        cfg = from_args(exp + list(CONFIG) + [a for a in rest if not a.startswith("exp=")])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keep_compiled(cfg.out_dir.rstrip("/") + "-frontier/jax_cache")
    start = time.perf_counter()
    evals, runs = sweep(args, cfg)
    os.makedirs(args.results, exist_ok=True)
    write_jsonl(os.path.join(args.results, "offpolicy.jsonl"), evals + runs)
    plot(evals, os.path.join(args.results, "offpolicy.png"))
    rows = table(evals, runs)
    command = "python -m p3o_jax.cli.offpolicy " + " ".join(argv)
    write_report(os.path.join(args.results, "offpolicy.md"), "\n".join([
        f"`{command}` ({(time.perf_counter() - start) / 60:.0f} minutes on {os.cpu_count()} "
        f"CPU cores, SFT and RM included when trained here; load average at the end "
        f"{load_average()})", "",
        f"Final policies after {cfg.rl.iterations} iterations at beta {args.beta:g} on "
        f"{cfg.eval_prompts} held-out prompts: mean ± SE across seeds. Clip fraction, "
        f"importance weight (`rl.rollout_is={cfg.rl.rollout_is}`, cap "
        f"{cfg.rl.rollout_is_cap:g}), the share of weights capped and the sampler gap "
        f"|log pi_behav - log pi_prox| per token are means over the iterations; seconds per "
        f"iteration are medians.", "", markdown(rows), "", "Verdict (P3O against the best "
        "other method of each regime, final held-out gold reward):", "", *verdicts(rows), ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
