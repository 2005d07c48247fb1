"""Arithmetic problems with verifiable answers, as conversational JSONL files: the own-data
example (experiments/arithmetic.py) and a task for reward functions (`math_answer`).

    python scripts/arithmetic_prompts.py OUT_DIR [--kind sum|larger] [--n 2000] [--max 20]
                                         [--seed 0] [--noise 0.3] [--ops +-] [--suffix TEXT]
                                         [--kind steps --terms 4]
                                         [--n-eval N] [--no-sft]

writes, from one seeded generator:
    OUT_DIR/prompts.jsonl  {"prompt": [{"role": "user", "content": "What is 7 + 12?"}],
                            "answer": "19"}                     (RL prompts)
    OUT_DIR/eval.jsonl     the same, other problems             (held-out prompts)
    OUT_DIR/sft.jsonl      {"prompt": [...], "completion": [{"role": "assistant",
                            "content": "#### 19"}]}             (demonstrations, a fraction
                                                                 `noise` of them wrong)
Problems (0 <= a, b <= max): "sum", a + b or a - b ("What is 7 + 12?"; `--ops +`: sums
only); "larger", the larger of two numbers ("Which is larger, 37 or 52?"); "steps", `--terms`
numbers added or subtracted in turn ("What is 17 + 4 - 9 + 30?", several steps to reason). `--suffix` is
appended to every question (" Answer with the number only."). The first `--n-eval` problems
(default a tenth) are held out: eval problems are disjoint from the others.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def problems(rng: np.random.Generator, n: int, largest: int, kind: str = "sum",
             ops: str = "+-", terms: int = 4) -> list[tuple[str, int]]:
    """n distinct (question, answer) pairs (fewer if there are not that many)."""
    seen, out = set(), []
    for _ in range(20 * n):
        if kind == "steps":           # terms numbers, each added or subtracted (ops)
            x = [int(v) for v in rng.integers(0, largest + 1, terms)]
            signs = [ops if len(ops) == 1 else "+-"[int(rng.random() < 0.5)] for _ in x[1:]]
            text = " ".join([str(x[0])] + [f"{o} {v}" for o, v in zip(signs, x[1:])])
            if text in seen:
                continue
            seen.add(text)
            out.append((f"What is {text}?",
                        x[0] + sum(v if o == "+" else -v for o, v in zip(signs, x[1:]))))
            if len(out) == n:
                break
            continue
        a, b = (int(x) for x in rng.integers(0, largest + 1, 2))
        op = "+" if rng.random() < 0.5 else "-"
        op = op if len(ops) > 1 else ops
        if (a, op, b) in seen or (kind == "larger" and a == b):
            continue
        seen.add((a, op, b))
        if kind == "larger":
            out.append((f"Which is larger, {a} or {b}?", max(a, b)))
        else:
            out.append((f"What is {a} {op} {b}?", a + b if op == "+" else a - b))
        if len(out) == n:
            break
    return out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--kind", choices=("sum", "larger", "steps"), default="sum")
    parser.add_argument("--terms", type=int, default=4, help="kind=steps: numbers per problem")
    parser.add_argument("--n", type=int, default=2000, help="problems in all")
    parser.add_argument("--max", type=int, default=20, help="largest operand")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.3, help="wrong demonstrations")
    parser.add_argument("--ops", choices=("+-", "+", "-"), default="+-", help="kind=sum's")
    parser.add_argument("--suffix", default="", help="appended to every question")
    parser.add_argument("--n-eval", type=int, default=0, help="held out (0: a tenth)")
    parser.add_argument("--sft", action=argparse.BooleanOptionalAction, default=True,
                        help="write sft.jsonl")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    every = [(q + args.suffix, a) for q, a in problems(rng, args.n, args.max, args.kind, args.ops,
                                                        args.terms)]
    n_eval = args.n_eval or max(len(every) // 10, 1)
    if n_eval >= len(every):
        parser.error(f"--n-eval {n_eval}: only {len(every)} distinct problems")
    held_out, train = every[:n_eval], every[n_eval:]
    os.makedirs(args.out_dir, exist_ok=True)
    write(os.path.join(args.out_dir, "prompts.jsonl"),
          [{"prompt": user(q), "answer": str(a)} for q, a in train])
    write(os.path.join(args.out_dir, "eval.jsonl"),
          [{"prompt": user(q), "answer": str(a)} for q, a in held_out])
    if not args.sft:
        print(f"{args.out_dir}: {len(train)} prompts, {len(held_out)} held out")
        return
    wrong = rng.random(len(train)) < args.noise
    shift = rng.integers(1, 4, len(train)) * rng.choice([-1, 1], len(train))
    write(os.path.join(args.out_dir, "sft.jsonl"),
          [{"prompt": user(q), "completion": [{"role": "assistant",
                                               "content": f"#### {a + s if w else a}"}]}
           for (q, a), w, s in zip(train, wrong, shift)])
    print(f"{args.out_dir}: {len(train)} prompts, {len(held_out)} held out")


if __name__ == "__main__":
    main()
