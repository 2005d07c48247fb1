"""Metrics JSONL: rows of resumed steps are not logged twice; other algorithms' rows stay."""
import json

from p3o_jax.logger import MetricsLogger


def test_metrics_logger_rewind_drops_rows_to_be_redone(tmp_path):
    """A stage resumed at step s drops its rows from s on, its eval rows after s, and any torn
    or unparsable line; other stages' rows (another algorithm's too) stay, in order."""
    path = tmp_path / "metrics.jsonl"
    rows = [("sft", 0), ("sft", 5), ("rm", 3), ("eval:p3o", 0), ("rl:ppo", 0), ("eval:ppo", 4),
            ("rl:p3o", 0), ("rl:p3o", 1), ("eval:p3o", 2), ("rl:p3o", 2), ("rl:p3o", 3),
            ("eval:p3o", 4)]
    lines = [json.dumps({"stage": s, "step": t, "time": 0.0}) + "\n" for s, t in rows]
    path.write_text("".join(lines[:-1]) + '{"stage": "rl:p3o", "st' + lines[-1] + '{"stage": "r')
    log = MetricsLogger(str(tmp_path))
    log.rewind("rl:p3o", 2, "eval:p3o")
    log.log("rl:p3o", 2, {"x": 1.0})
    log.close()
    kept = [(r["stage"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]
    assert kept == [("sft", 0), ("sft", 5), ("rm", 3), ("eval:p3o", 0), ("rl:ppo", 0),
                    ("eval:ppo", 4), ("rl:p3o", 0), ("rl:p3o", 1), ("eval:p3o", 2), ("rl:p3o", 2)]
    log = MetricsLogger(str(tmp_path))
    log.rewind("rl:p3o", 0, "eval:p3o")    # a restart from scratch: every p3o row goes
    log.close()
    kept = [(r["stage"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]
    assert kept == [("sft", 0), ("sft", 5), ("rm", 3), ("rl:ppo", 0), ("eval:ppo", 4)]
