"""Train: SFT -> reward model -> RL, then the evaluation table (p3o_jax/pipeline.py).

    python -m p3o_jax.cli.train exp=toy [key=value ...]       (`make train EXP=toy ARGS="..."`)
    python -m p3o_jax.cli.train --help [exp=tldr]             (every key; also help=true)

Exit codes: 0 done; 1 too many non-finite updates in a row; 2 a bad config, named in one line
(also a checkpoint written with an incompatible one, bad data, a reward function that cannot be
loaded); 3 a reward function failed on a batch (raised, wrong length, NaN or inf: one line
naming it and the prompt's row; fix it and run the same command again); 75 stopped by SIGTERM/SIGINT with a
checkpoint saved (run the same command again to continue); 143/130 a second SIGTERM/SIGINT
(immediate exit).

Also exit 2: another run holds the out_dir (p3o_jax/run_lock.py), an earlier stage the run
loads is missing or a pretrained folder cannot serve its role (p3o_jax/preflight.py), data that
cannot be read (whatever the OSError); exit 74 (`storage.EXIT_IO_ERROR`): one of the run's
writes failed (checkpoints, params, exports, logs, config.json, summary.json, the eval records,
the tokenised-data cache), e.g. a full disk, in one line naming the path, the free space and
the last complete checkpoint, and nothing else on stderr. Each error is classified where it
happens: a reward function's OSError is exit 3, a data read's exit 2 (p3o_jax/storage.py).
"""
from __future__ import annotations

import sys

from p3o_jax import checkpoint, distributed, storage
from p3o_jax.cli.help import help_text, wants_help
from p3o_jax.checks import ConfigError
from p3o_jax.config_args import from_args
from p3o_jax.pipeline import run_experiment
from p3o_jax.reward_calls import RewardError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, argv))
        return 0
    try:
        cfg = from_args(argv)
        distributed.initialize(cfg.dist)  # before anything touches a device
        run_experiment(cfg)               # resolves the config before anything else
    except ConfigError as e:  # also: a checkpoint written with an incompatible config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except storage.WriteFailed as e:  # a full disk, a quota, a read-only filesystem
        print(f"error: {e}", file=sys.stderr)    # alone: orbax's threads print nothing of it
        return storage.EXIT_IO_ERROR
    except checkpoint.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RewardError as e:  # a reward function failed; the last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 3
    except checkpoint.Preempted as e:
        print(e, file=sys.stderr)
        return checkpoint.EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
