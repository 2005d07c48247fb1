"""Metrics JSONL: rows of resumed steps are not logged twice; other algorithms' rows stay. The
backends of `log.backends`: TensorBoard, and W&B offline."""
import json
import time

import pytest

from p3o_jax.checks import ConfigError
from p3o_jax.config_args import from_args
from p3o_jax.logger import LogConfig, MetricsLogger


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


def test_backends_offline_wandb_holds_the_metrics_and_the_config(tmp_path, monkeypatch):
    """log.backends=jsonl,tensorboard,wandb without an API key (HOME without ~/.netrc): W&B runs
    offline, and its run file under <dir>/wandb holds every metric and the config; a second
    logger on the same folder (a resumed run) continues the same W&B run."""
    import wandb  # noqa: F401  (requirements-test.txt; an optional extra of the library)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    log_cfg = LogConfig(backends="jsonl,tensorboard,wandb")
    run = tmp_path / "run"
    for stage, metrics in (("sft", {"loss": 1.5}), ("rl:p3o", {"kl_k1": 0.25})):
        log = MetricsLogger(str(run), log=log_cfg, config={"rl": {"beta": 0.125}}, name="toy")
        log.log(stage, 3, metrics)
        log.close()
        time.sleep(1.1)     # W&B names a run's offline folder by the second it starts
    assert [json.loads(line)["stage"] for line in (run / "metrics.jsonl").open()] == [
        "sft", "rl:p3o"]
    assert list((run / "tb").iterdir())
    run_id = (run / "wandb" / "run_id").read_text()
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2                       # both loggers wrote to the one W&B run
    data = b"".join(f.read_bytes() for f in files)
    for text in ('{"beta":0.125}', "sft/loss", "sft/step", "1.5", "rl:p3o/kl_k1", "0.25"):
        assert text.encode() in data, text


def test_backends_are_checked_and_only_those_asked_for_write(tmp_path):
    with pytest.raises(ConfigError, match="log.backends"):
        from_args(["log.backends=jsonl,wandbb"])
    log = MetricsLogger(str(tmp_path), log=from_args(["log.backends=jsonl"]).log)
    log.log("sft", 0, {"loss": 1.0})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
