"""The KL-reward frontier of P3O against its baselines, and the reward-offset invariance.

    python -m p3o_jax.cli.frontier [exp=toy] [quick=true] [key=value ...]   (`make frontier`)
    python -m p3o_jax.cli.frontier invariance=true [key=value ...]

Per seed, SFT and the reward model are trained once (`run_experiment` with `stages=sft,rm` in
`<out_dir>-frontier/seed<S>`, `<out_dir>-frontier-quick/seed<S>` for the quick sweep; run again,
the finished stages are reused). Every RL run -- a
method at a beta -- then has its own folder below, linking that seed's `sft`, `rm` and
`preferences.npz`, and runs `stages=rl` with `rl.eval_every`, so each run (and its checkpoints)
resumes on its own. The "eval" rows of all runs (every checkpoint evaluated on the same held-out
prompts) go to `<results>/frontier.jsonl`, the plot to `frontier.png` and the table of the final
policies to `frontier.md`.

beta is the KL coefficient of `max E[r] - beta KL`. P3O and PPO take it as `rl.beta`; for DPO
(online and offline) it is `dpo.beta`, the same coefficient in DPO's derivation (the optimum
of that objective is pi_ref * exp(r / beta)), only with the reward model replaced by its
preference labels.

The methods (`METHODS`) run at k = 2 responses per prompt, except the k = 4 comparison
(`*-k4`), which takes half as many prompts per iteration so that every run samples as many
responses. `timings.md` (and `timings.jsonl`) has the wall time of each run.

`invariance=true` runs P3O (V2) and PPO at `rl.beta=0.1` with and without `rl.reward_offset`
(a random per-prompt shift delta(x) of the reward model's scores) and writes `invariance.png`,
`invariance.jsonl` and `invariance.md` (the largest difference between the learning curves).

Keys of this command (the others override the experiment's config): quick, invariance, seeds,
betas, methods (comma-separated names of METHODS), offset (invariance), results (the folder:
experiments/results by default, experiments/results/quick with quick=true).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Annotated

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np

from p3o_jax.algos import ALGORITHMS
from p3o_jax.checks import NonNegative, OneOf
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.checks import ConfigError
from p3o_jax.config import ExperimentConfig
from p3o_jax.config_args import from_args, override, tool_args
from p3o_jax.evaluate import mean_se_over_runs
from p3o_jax.logger import format_table
from p3o_jax.pipeline import make_task, offline_steps, run_experiment
from p3o_jax.rl import prompt_offset

def at_k(k: int, over):
    """A method with k responses per prompt and proportionally fewer prompts per iteration, so
    that it samples and scores as many responses per iteration (and per run) as at k = 2."""
    return lambda b, cfg: {**over(b, cfg), "rl.n_samples": k,
                           "rl.prompts_per_iter": cfg.rl.prompts_per_iter * 2 // k}


# name -> (beta, the base config) -> the config keys of that run
METHODS = {
    "P3O-V1": lambda b, cfg: {"algo": "p3o", "p3o.clip": "separate", "rl.beta": b},
    "P3O-V2": lambda b, cfg: {"algo": "p3o", "p3o.clip": "joint", "rl.beta": b},
    "PPO": lambda b, cfg: {"algo": "ppo", "rl.beta": b},
    "DPO-online": lambda b, cfg: {"algo": "dpo", "dpo.beta": b},
    "DPO-offline": lambda b, cfg: {"algo": "dpo_offline", "dpo.beta": b},
    "RLOO": lambda b, cfg: {"algo": "rloo", "rl.beta": b},
    "GRPO": lambda b, cfg: {"algo": "grpo", "rl.beta": b},          # std, per-sequence, k3 loss
    "Dr.GRPO": lambda b, cfg: {"algo": "grpo", "grpo.normalise_std": False,
                               "grpo.aggregation": "constant", "rl.beta": b},
    "GSPO": lambda b, cfg: {"algo": "gspo", "rl.beta": b},
}
# k = 4 at equal samples: 4 responses to each of half as many prompts
METHODS.update({f"{name}-k4": at_k(4, METHODS[name]) for name in ("P3O-V2", "GRPO", "RLOO")})


@dataclasses.dataclass(frozen=True)
class Sweep:
    seeds: tuple[int, ...] = (0, 1, 2)
    betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    methods: tuple[str, ...] = tuple(METHODS)
    # (method, betas): methods run only at those of `betas` (the k = 4 comparison, for time)
    method_betas: tuple[tuple[str, tuple[float, ...]], ...] = ()
    evals: int = 4                  # evaluations along each run, besides the one at its start
    offset: float = 5.0             # invariance: rl.reward_offset
    # config keys the sweep sets (the command line's keys come after, and win)
    config: tuple[str, ...] = ("rl.iterations=40", "eval_prompts=256")
    folder: str = "frontier"        # runs go to <out_dir>-<folder>/seed<S>/<method>-beta<beta>

    def betas_of(self, method: str) -> tuple[float, ...]:
        only = dict(self.method_betas).get(method)
        return tuple(b for b in self.betas if only is None or b in only)


K4 = ("P3O-V2-k4", "GRPO-k4", "RLOO-k4")
FULL = Sweep(method_betas=tuple((m, (0.1, 0.3)) for m in K4))
# the quick sweep fits 6 minutes on 2 CPU cores: half the SFT and RM steps, one beta, 12
# iterations, and the methods the full sweep adds to P3O-V2 and PPO
QUICK = Sweep(seeds=(0,), betas=(0.1,),
              methods=("P3O-V2", "PPO", "RLOO", "GRPO", "Dr.GRPO", "GSPO") + K4,
              config=("rl.iterations=12", "eval_prompts=128", "sft.steps=500", "rm.steps=250"),
              folder="frontier-quick")
INVARIANCE = Sweep(seeds=(0,), betas=(0.1,), methods=("P3O-V2", "PPO"), evals=0,
                   config=("rl.iterations=20", "eval_prompts=128"))


@dataclasses.dataclass(frozen=True)
class FrontierArgs:
    """This command's own keys (every other key overrides the experiment's config)."""
    quick: bool = False
    invariance: bool = False
    results: str = ""               # "": experiments/results (quick: experiments/results/quick)
    seeds: Annotated[tuple[int, ...] | None, NonNegative] = None   # None: the sweep's (all
                                                                   # three: comma-separated)
    betas: tuple[float, ...] | None = None
    methods: Annotated[tuple[str, ...] | None, OneOf(*METHODS)] = None
    offset: Annotated[float | None, NonNegative] = None            # invariance: rl.reward_offset


def parse(argv: list[str]) -> tuple[Sweep, str, bool, ExperimentConfig]:
    """The sweep, the results folder, whether to run the invariance experiment, and the base
    config (the experiment with the sweep's and the command line's overrides)."""
    args, rest = tool_args(argv, FrontierArgs())
    sweep = INVARIANCE if args.invariance else QUICK if args.quick else FULL
    given = {"seeds": args.seeds, "betas": args.betas, "offset": args.offset,
             "methods": args.methods}
    sweep = dataclasses.replace(sweep, **{k: v for k, v in given.items() if v is not None})
    exp = [a for a in rest if a.startswith("exp=")]
    cfg = from_args(exp + list(sweep.config) + [a for a in rest if not a.startswith("exp=")])
    default = "experiments/results" + ("/quick" if args.quick and not args.invariance else "")
    return sweep, args.results or default, args.invariance, cfg


def overridden(cfg: ExperimentConfig, over: dict) -> ExperimentConfig:
    for key, value in over.items():
        cfg = override(cfg, key, str(value))
    return cfg


def train_sft_rm(cfg: ExperimentConfig, seed: int, folder: str) -> str:
    """SFT and the reward model of `seed` (reused if finished): their folder."""
    path = os.path.join(f"{cfg.out_dir.rstrip('/')}-{folder}", f"seed{seed}")
    run_experiment(dataclasses.replace(cfg, seed=seed, out_dir=path, stages="sft,rm"))
    jax.clear_caches()
    return path


def rl_run(cfg: ExperimentConfig, base: str, name: str, over: dict) -> list[dict]:
    """One RL run in `<base>/<name>` on `base`'s SFT and RM: its metrics rows (the last row
    logged for each stage and step, so a resumed run counts once)."""
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    for shared in ("sft", "rm", "preferences.npz"):
        link = os.path.join(path, shared)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", shared), link)
    run_experiment(overridden(dataclasses.replace(cfg, out_dir=path, stages="rl"), over))
    # release the run's compiled programs: each keeps ~1000 memory maps of JIT code alive, and
    # a process may hold 65530 (vm.max_map_count), so without this a sweep dies after ~60 runs
    # ("LLVM compilation error: Cannot allocate memory"); the disk cache reloads them
    jax.clear_caches()
    rows = {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            rows[r["stage"], r["step"]] = r
    return list(rows.values())


def rl_steps(cfg: ExperimentConfig) -> int:
    """The steps of the rl stage: iterations, or for an offline algorithm its batches."""
    return offline_steps(cfg) if ALGORITHMS[cfg.algo].offline else cfg.rl.iterations


# ---------------------------------------------------------------------------------------------
# the frontier

def frontier(sweep: Sweep, cfg: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    """Every evaluation of every run: dicts with method, beta, seed, step, steps (the run's
    total), final, and the "eval" metrics (`evaluate.compare` against the SFT policy); and the
    wall time of each run in this call (method "SFT+RM": a seed's first two stages)."""
    records, timings = [], []
    for seed in sweep.seeds:
        start = time.perf_counter()
        base = train_sft_rm(cfg, seed, sweep.folder)
        timings.append({"method": "SFT+RM", "beta": None, "seed": seed,
                        "seconds": time.perf_counter() - start})
        for method in sweep.methods:
            for beta in sweep.betas_of(method):
                over = METHODS[method](beta, cfg)
                steps = rl_steps(overridden(cfg, over))
                over["rl.eval_every"] = max(steps // sweep.evals, 1)
                start = time.perf_counter()
                rows = rl_run(dataclasses.replace(cfg, seed=seed), base,
                              f"{method}-beta{beta:g}", over)
                timings.append({"method": method, "beta": beta, "seed": seed,
                                "seconds": time.perf_counter() - start})
                records += [{"method": method, "beta": beta, "seed": seed, "step": r["step"],
                             "steps": steps, "final": r["step"] == steps,
                             **{k: v for k, v in r.items() if k not in ("stage", "step", "time")}}
                            for r in sorted(rows, key=lambda r: r["step"])
                            if r["stage"].startswith("eval:")]
    return records, timings


def final_rows(records: list[dict]) -> list[dict]:
    """The table: SFT (the runs' start), then each method and beta's final policy."""
    groups = {("SFT", ""): list({r["seed"]: r for r in records if r["step"] == 0}.values())}
    for r in records:
        if r["final"]:
            groups.setdefault((r["method"], f"{r['beta']:g}"), []).append(r)
    rows = []
    for (method, beta), rs in groups.items():
        row = {"policy": method, "beta": beta, "seeds": len(rs)}
        for k in ("kl_k1", "kl_k3", "gold", "rm", "win_gold", "win_rm", "length"):
            row[k], row[k + "_se"] = mean_se_over_runs([r[k] for r in rs],
                                                       [r[k + "_se"] for r in rs])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [("policy", "policy"), ("beta", "beta"), ("seeds", "seeds"), ("kl_k1", "KL (k1)"),
            ("kl_k3", "KL (k3)"), ("gold", "gold reward"), ("rm", "RM reward"),
            ("win_gold", "gold win vs SFT"), ("win_rm", "RM win vs SFT"), ("length", "length")]
    cell = lambda r, k: (f"{round(r[k], 3) + 0.0:.3f} ± {r[k + '_se']:.3f}"  # + 0.0: no "-0.000"
                         if k + "_se" in r else str(r[k]))
    return format_table([{name: cell(r, k) for k, name in cols} for r in rows],
                        [name for _, name in cols])


def plot_frontier(records: list[dict], path: str, zoom_kl: float = 1.5) -> None:
    """Gold reward vs KL (all of it, and zoomed on KL <= `zoom_kl` where the methods crowd)
    and proxy (RM) reward vs KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = final_rows(records)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    colors = {m: plt.get_cmap("tab20")(i) for i, m in enumerate(METHODS)}
    panels = ((axes[0], "gold", "gold reward (hidden)", None),
              (axes[1], "gold", f"gold reward, KL <= {zoom_kl:g}", zoom_kl),
              (axes[2], "rm", "proxy reward (RM)", None))
    for ax, y, label, zoom in panels:
        for method in METHODS:
            pts = [r for r in records if r["method"] == method and r["step"] > 0]
            if not pts:
                continue
            ax.scatter([r["kl_k1"] for r in pts], [r[y] for r in pts], s=10, alpha=0.25,
                       color=colors[method])
            fin = sorted((r for r in rows if r["policy"] == method), key=lambda r: r["kl_k1"])
            ax.errorbar([r["kl_k1"] for r in fin], [r[y] for r in fin],
                        xerr=[r["kl_k1_se"] for r in fin], yerr=[r[y + "_se"] for r in fin],
                        marker="o", capsize=2, elinewidth=0.8, color=colors[method], label=method)
            for r in fin:
                ax.annotate(f"β={r['beta']}", (r["kl_k1"], r[y]), fontsize=7,
                            textcoords="offset points", xytext=(4, -9), color=colors[method])
        sft = next(r for r in rows if r["policy"] == "SFT")
        ax.scatter([sft["kl_k1"]], [sft[y]], marker="*", s=160, color="black", label="SFT", zorder=5)
        if zoom is not None:
            near = [r[y] for r in rows if r["policy"] != "SFT" and r["kl_k1"] <= zoom]
            if near:
                ax.set_xlim(min(r["kl_k1"] for r in rows if r["policy"] != "SFT") - 0.1, zoom)
                ax.set_ylim(min(near) - 0.1, max(near) + 0.1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("KL(π || π_SFT) on eval prompts (k1, nats per response)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    seeds = sorted({r["seed"] for r in records})
    axes[0].legend(fontsize=8)
    fig.suptitle(f"KL–reward frontier (final policies: lines, ± SE; checkpoints along the runs: "
                 f"dots; {len(seeds)} seed{'s' * (len(seeds) > 1)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the invariance experiment

def invariance(sweep: Sweep, cfg: ExperimentConfig) -> tuple[list[dict], dict]:
    """P3O-V2 and PPO at `sweep.betas[0]`, with and without `rl.reward_offset = sweep.offset`:
    per-iteration rows (gold, KL, the reward, RM score plus offset, minus the batch's mean
    offset) and, per method, the largest absolute difference between the two runs' curves."""
    seed, beta = sweep.seeds[0], sweep.betas[0]
    base = train_sft_rm(cfg, seed, sweep.folder)
    task, chunk = make_task(cfg), cfg.rl.prompts_per_iter
    records, diffs = [], {}
    for method in sweep.methods:
        curves = {}
        for offset in (0.0, sweep.offset):
            over = {**METHODS[method](beta, cfg), "rl.reward_offset": offset}
            rows = rl_run(dataclasses.replace(cfg, seed=seed), base,
                          f"invariance-{method}-offset{offset:g}", over)
            rl_rows = sorted((r for r in rows if r["stage"].startswith("rl:")),
                             key=lambda r: r["step"])
            for r in rl_rows:
                ids, mask = task.prompts(chunk, "rl", r["step"] * chunk)
                shift = offset * float(np.mean(prompt_offset(ids, mask)))
                records.append({"method": method, "offset": offset, "iteration": r["step"],
                                "gold_reward": r["gold_reward"], "kl_k1": r["kl_k1"],
                                "rm_reward_minus_offset": r["reward"] - shift})
            curves[offset] = records[-len(rl_rows):]
        a, b = curves[0.0], curves[sweep.offset]
        diffs[method] = {k: max(abs(x[k] - y[k]) for x, y in zip(a, b))
                         for k in ("gold_reward", "kl_k1", "rm_reward_minus_offset")}
    return records, diffs


def plot_invariance(records: list[dict], offset: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = (("gold_reward", "gold reward of the rollouts"),
            ("rm_reward_minus_offset", "RM score − offset δ(x)"), ("kl_k1", "KL to SFT (k1)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"P3O-V2": "tab:blue", "PPO": "tab:red"}
    for ax, (key, label) in zip(axes, keys):
        for method in colors:
            for off, style in ((0.0, "-"), (offset, "--")):
                rs = [r for r in records if r["method"] == method and r["offset"] == off]
                if rs:
                    ax.plot([r["iteration"] for r in rs], [r[key] for r in rs], style,
                            color=colors[method], lw=2.5 if off == 0 else 1.5,
                            label=f"{method}, {'no offset' if off == 0 else f'offset {off:g}·δ(x)'}")
        ax.set_xlabel("RL iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Adding a per-prompt offset δ(x) ~ N(0,1)·scale to the reward model: "
                 "P3O's curves coincide, PPO's move")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_report(path: str, text: str) -> None:
    """The markdown summary: to `path` and to the terminal."""
    with open(path, "w") as f:
        f.write(text)
    print(text)


def keep_compiled(folder: str) -> None:
    """The runs of a sweep compile the same programs again and again: keep them in `folder`
    (jax's persistent compilation cache) across runs."""
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    compilation_cache.reset_cache()     # jax decides once per process: decide again, now


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (the runs share its cores)."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def timing_table(timings: list[dict]) -> str:
    """Seconds per RL run: a row per method, a column per beta (summed over seeds)."""
    betas = sorted({t["beta"] for t in timings if t["beta"] is not None})
    rows = {}
    for t in timings:
        if t["beta"] is not None:
            row = rows.setdefault(t["method"], {"method": t["method"]})
            key = f"beta {t['beta']:g}"
            row[key] = f"{float(row.get(key, 0)) + t['seconds']:.0f}"
    return format_table(list(rows.values()), ["method"] + [f"beta {b:g}" for b in betas])


def timings_report(command: str, took: str, timings: list[dict]) -> str:
    seeds = len({t["seed"] for t in timings})
    return (f"`{command}` ({took})\n\nWall time of each RL run in this call, in seconds, "
            f"summed over {seeds} seed(s) (a run finished by an earlier call only reads its "
            f"metrics); SFT and RM took "
            f"{sum(t['seconds'] for t in timings if t['beta'] is None):.0f} s; load average at "
            f"the end {load_average()}:\n\n{timing_table(timings)}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv, own=FrontierArgs()))
        return 0
    try:
        sweep, results, inv, cfg = parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(results, exist_ok=True)
    keep_compiled(cfg.out_dir.rstrip("/") + "-frontier/jax_cache")
    command = "python -m p3o_jax.cli.frontier " + " ".join(argv)
    start = time.perf_counter()
    took = lambda: f"{(time.perf_counter() - start) / 60:.1f} minutes on {os.cpu_count()} CPU cores"
    if inv:
        records, diffs = invariance(sweep, cfg)
        write_jsonl(os.path.join(results, "invariance.jsonl"), records)
        plot_invariance(records, sweep.offset, os.path.join(results, "invariance.png"))
        table = format_table([{"method": m, **d} for m, d in diffs.items()],
                             ["method", "gold_reward", "kl_k1", "rm_reward_minus_offset"])
        text = (f"`{command}`\n\nLargest absolute difference between the per-iteration curves "
                f"with and without `rl.reward_offset={sweep.offset:g}` ({cfg.rl.iterations} "
                f"iterations, beta {sweep.betas[0]:g}, seed {sweep.seeds[0]}; {took()}):\n\n"
                f"{table}\n")
        write_report(os.path.join(results, "invariance.md"), text)
        return 0
    records, timings = frontier(sweep, cfg)
    write_jsonl(os.path.join(results, "frontier.jsonl"), records)
    write_jsonl(os.path.join(results, "timings.jsonl"), timings)
    plot_frontier(records, os.path.join(results, "frontier.png"))
    text = (f"`{command}` ({took()}, SFT and RM included)\n\n"
            f"Final policies on {cfg.eval_prompts} held-out prompts; ± is the SE "
            f"across seeds (over prompts when there is one seed). Win rates against the SFT "
            f"policy's response to the same prompt, ties counting 1/2.\n\n"
            f"{markdown(final_rows(records))}\n")
    write_report(os.path.join(results, "frontier.md"), text)
    write_report(os.path.join(results, "timings.md"), timings_report(command, took(), timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
