#!/usr/bin/env python3
"""Run one command as N cooperating JAX processes on this machine (what the tests use).

    python scripts/launch_local.py -n 2 --devices-per-process 2 -- \\
        python -m p3o_jax.cli.train exp=toy mesh.fsdp=2 mesh.tensor=2

Each process gets `JAX_COORDINATOR_ADDRESS` (127.0.0.1 and a free port), `JAX_NUM_PROCESSES`
and `JAX_PROCESS_ID`, which `p3o_jax.distributed.initialize` reads, and its own devices: by
default `--devices-per-process` fake CPU devices (`XLA_FLAGS`), with `--cuda` that many GPUs
(`CUDA_VISIBLE_DEVICES`, consecutive blocks). Together they form one run with N x D devices,
exactly as hosts of a TPU pod slice or nodes of a GPU cluster do.

If a process fails, the others are stopped (they would otherwise wait for it until JAX's
heartbeat timeout); SIGTERM and SIGINT are passed on to every process (a run stops at a
checkpoint); `--timeout` stops everything. The exit code is the first failure's (128 + N for
signal N), 124 on timeout, else 0. With `--log-dir`, process i writes to `process_<i>.log`.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 10  # between SIGTERM and SIGKILL when stopping the others


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, devices: int, cuda: bool, port: int) -> dict:
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
    if cuda:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * devices + d) for d in range(devices))
    else:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, SIGKILL those left after GRACE_S, reap all."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: list[str], n: int, devices: int, cuda: bool = False,
           timeout: float | None = None, log_dir: str | None = None) -> int:
    port = free_port()
    logs = []
    procs: list[subprocess.Popen] = []
    forward = lambda signum, _: [p.send_signal(signum) for p in procs if p.poll() is None]
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(n):
            out = None
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
                logs.append(out)
            procs.append(subprocess.Popen(command, env=process_env(i, n, devices, cuda, port),
                                          stdout=out, stderr=subprocess.STDOUT if out else None))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                stop(procs)
                return exit_code(failed[0])
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch_local: timed out after {timeout} s", file=sys.stderr)
                stop(procs)
                return 124
            time.sleep(0.1)
    finally:
        stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
        for f in logs:
            f.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- command ...")
    parser.add_argument("-n", "--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--cuda", action="store_true",
                        help="give each process real GPUs instead of fake CPU devices")
    parser.add_argument("--timeout", type=float, help="seconds before everything is stopped")
    parser.add_argument("--log-dir", help="write process i's output to process_<i>.log here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    return launch(command, args.processes, args.devices_per_process, args.cuda, args.timeout,
                  args.log_dir)


if __name__ == "__main__":
    sys.exit(main())
