"""The committed results can be recomputed from their per-prompt files: each run's summary.json
(experiments/results/**/summary.json) holds, for each evaluated policy, the mean of each reward
function over its eval_<policy>.jsonl records, and `math_answer` graded again from each
record's response and its prompt's answer (the experiment's data, read at the record's row)
gives the committed value."""
import glob
import json
import math
import os

import numpy as np
import pytest

from p3o_jax.builtin_rewards import math_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARIES = sorted(glob.glob(os.path.join(ROOT, "experiments", "results", "**", "summary.json"),
                             recursive=True))


def records(folder, policy):
    with open(os.path.join(folder, f"eval_{policy}.jsonl")) as f:
        return [json.loads(line) for line in f]


def answers(origin_rows):
    """The `answer` column of each (data file, row) an eval record came from, the file found
    under this checkout's experiments/data whatever the path it was run from."""
    out, files = [], {}
    for path, row in origin_rows:
        local = os.path.join(ROOT, "experiments", path.split("/experiments/", 1)[1])
        if local not in files:
            with open(local) as f:
                files[local] = [json.loads(line) for line in f]
        out.append(files[local][row]["answer"])
    return out


def test_results_are_committed_with_their_records():
    assert len(SUMMARIES) >= 2       # EXP=arithmetic and the SmolLM2 comparison's runs


@pytest.mark.parametrize("summary", SUMMARIES,
                         ids=[os.path.relpath(os.path.dirname(s), ROOT) for s in SUMMARIES])
def test_a_summary_is_the_mean_of_its_records_and_math_answer_grades_again(summary):
    folder = os.path.dirname(summary)
    with open(summary) as f:
        rows = json.load(f)["rows"]
    for row in rows:
        recs = records(folder, row["policy"])
        names = sorted({k for r in recs for k in r["rewards"]})
        assert names, row["policy"]
        for name in names:
            values = [r["rewards"].get(name) for r in recs]
            kept = [v for v in values if v is not None and not math.isnan(v)]
            assert np.mean(kept) == pytest.approx(row[name], abs=1e-6), (row["policy"], name)
        if "math_answer" in names:
            origin = [r["origin"].rsplit(" row ", 1) for r in recs]
            gold = answers([(path, int(row_)) for path, row_ in origin])
            again = math_answer([r["response"] for r in recs], gold)
            assert again == [r["rewards"]["math_answer"] for r in recs], row["policy"]
