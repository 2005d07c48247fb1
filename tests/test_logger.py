"""Metrics JSONL: rows of resumed steps are not logged twice."""
import json

from p3o_jax.logger import MetricsLogger


def test_metrics_logger_rewind_drops_rows_to_be_redone(tmp_path):
    """A stage resumed at step s drops its rows from s on, the rl stage also the eval rows
    after s, and any torn or unparsable line; other stages' rows stay, in order."""
    path = tmp_path / "metrics.jsonl"
    rows = [("sft", 0), ("sft", 5), ("rm", 3), ("eval", 0), ("rl", 0), ("rl", 1), ("eval", 2),
            ("rl", 2), ("rl", 3), ("eval", 4)]
    lines = [json.dumps({"stage": s, "step": t, "time": 0.0}) + "\n" for s, t in rows]
    path.write_text("".join(lines[:-1]) + '{"stage": "rl", "st' + lines[-1] + '{"stage": "r')
    log = MetricsLogger(str(tmp_path))
    log.rewind("rl", 2)
    log.log("rl", 2, {"x": 1.0})
    log.close()
    kept = [(r["stage"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]
    assert kept == [("sft", 0), ("sft", 5), ("rm", 3), ("eval", 0), ("rl", 0), ("rl", 1),
                    ("eval", 2), ("rl", 2)]
    log = MetricsLogger(str(tmp_path))
    log.rewind("rl", 0)        # a restart from scratch: every rl and eval row goes
    log.close()
    kept = [(r["stage"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]
    assert kept == [("sft", 0), ("sft", 5), ("rm", 3)]
