"""The README's table of real compiles from compile_check's JSON lines (bench/compile_grid.sh):

    python bench/compile_table.py [bench/compile_check.jsonl]
    python bench/compile_table.py compare BEFORE.jsonl bench/compile_check.jsonl

One markdown row per compiled program, by model, target and program (a row kept from an
earlier commit's compile, marked `compiled_before`, shows † after its mode), GiB per device: XLA's arguments / outputs - aliased /
temporaries, `resident` (XLA's total plus the stage's other live arrays), the analytic plan's
estimate of the same program as p3o_jax/memory_plan.py computes it today (not the `plan_gib`
recorded at compile time) and their ratio, the compile time. `compare`: the rows of a later
file beside the same command's row in an earlier one (e.g. the grid rerun into another file
after a change, or with `LIBTPU_INIT_ARGS` set).
"""
import functools
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@functools.cache
def plan_gib(args: str, devices: int, program: str) -> float:
    """Today's plan of the program a compile_check command (`args`) compiled."""
    from p3o_jax.cli.compile_check import parse
    from p3o_jax.compile_check import program_plan
    from p3o_jax.config_resolve import resolve
    from p3o_jax.memory_plan import GIB
    cfg = resolve(parse(args.split())[1], devices)
    return program_plan(cfg, devices, program) / GIB


MODELS = ("pythia-6.9b", "llama-3-8b", "pythia-2.8b", "pythia-1b")
TARGETS = ("h100-x8", "v4-32", "v5e-16", "v5e-8", "v4-8")
PROGRAMS = ("rl_update", "rl_generate", "rl_score", "sft_step", "rm_step")
MODES = ("full", "full+remat-block", "top2", "lora-r8", "lora-r8+remat-block")


def order(r):
    """Rows by model, target (the grid's first), program (the update first) and mode, then
    as compiled; skipped commands last."""
    rank = lambda names, x: names.index(x) if x in names else len(names)
    if "skipped" in r:
        return (len(MODELS) + 1,)
    return (rank(MODELS, r["model"]), rank(TARGETS, r["target"]), r["target"],
            rank(PROGRAMS, r["program"]), rank(MODES, r["mode"]))


def main(path="bench/compile_check.jsonl"):
    rows = sorted((json.loads(line) for line in open(path)), key=order)
    print("| model | target (devices x GiB) | data x fsdp x tensor | RL trains | program | "
          "XLA args / out - alias / temp | resident | plan | resident / plan | compile s | fits |")
    print("|---" * 11 + "|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['args']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        plan = plan_gib(r["args"], r["devices"], r["program"])
        if "xla_gib" in r:
            xla = (f"{r['argument_gib']:.1f} / {r['output_gib'] - r['alias_gib']:.1f} / "
                   f"{r['temp_gib']:.1f}")
            resident, ratio = f"{r['resident_gib']:.1f}", f"{r['resident_gib'] / plan:.2f}"
        else:       # the TPU compiler refused it: its message gives the temporaries
            xla, resident, ratio = r["why"].split("(")[1].split(")")[0], "-", "-"
            xla = f"temp {xla}"
        fits = "yes" if r["fits"] else "**no**"
        mode = r["mode"] + (" bf16 params" if r["dtype"].startswith("bfloat16/") else "")
        mode += " streamed sampler" if "rl.sampler_gather_once=false" in r["args"] else ""
        mode += " †" if "compiled_before" in r else ""
        print(f"| {r['model']} | {r['target']} ({r['devices']} x {r['hbm_gib']:.0f}) | "
              f"{r['mesh'].replace('x', ' x ')} | {mode} | {r['program']} | {xla} | "
              f"{resident} | {plan:.1f} | {ratio} | "
              f"{r['compile_s']:.0f} | {fits} |")


def temp_gib(r) -> str:
    """XLA's temporaries; when the TPU compiler refused the program, its message's figure."""
    if "temp_gib" in r:
        return f"{r['temp_gib']:.1f}"
    return r["why"].split("temporaries (")[1].split("G)")[0]


def compare(before_path, after_path):
    key = lambda r: (r["args"], r.get("program"))
    before = {key(r): r for r in map(json.loads, open(before_path)) if "skipped" not in r}
    for r in map(json.loads, open(after_path)):
        b = before.get(key(r))
        if b is None or "skipped" in r or "compiled_before" in r:
            continue
        res = lambda x: f"{x['resident_gib']:.1f}" if "resident_gib" in x else "-"
        plan = plan_gib(r["args"], r["devices"], r["program"])
        ratio = f"{r['resident_gib'] / plan:.2f}" if "resident_gib" in r else "-"
        print(f"| {r['model']} | {r['target']} | {r['mode']} | {r['program']} | "
              f"{temp_gib(b)} -> {temp_gib(r)} | {res(b)} -> {res(r)} | {plan:.1f} | "
              f"{ratio} | {'yes' if r['fits'] else '**no**'} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        compare(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
