"""Reward servers: OpenRLHF's remote reward protocol, its client (`reward_fns=http://...`) and
our server (`python -m p3o_jax.cli.reward_server`): a served function scores what it scores
locally, extras come back as logs, failures are retried with backoff and end in one line, a
server that does not answer is a start-up error. The RL runs against a server process (killed
mid-run and resumed; slow, waited on beside the learner) are in tests/test_own_data.py."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from p3o_jax import remote_rewards as RR
from p3o_jax import reward_calls as R
from p3o_jax.checks import ConfigError, parse_reward_specs
from p3o_jax.cli import reward_server

HERE = os.path.dirname(os.path.abspath(__file__))
FNS = os.path.join(HERE, "reward_functions.py")


class Served:
    """An aiohttp application served from a thread on a free port (`url`)."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/score"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def load(spec, **remote):
    (f,), _ = R.load(spec, (), has_rm=False, response_len=10,
                     remote=RR.RemoteConfig(**remote))
    return f


def inputs(n):
    """A batch as FunctionRewards gives it to a reward server: conversational completions,
    the rendered prompts and sequences, an answer column, a verl-style reward_model column."""
    answers = [str(i % 3) for i in range(n)]
    texts = [f"so #### {i % 2}" for i in range(n)]
    return {"prompts": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
            "completions": [[{"role": "assistant", "content": t}] for t in texts],
            "completion_ids": [[5] * (i + 1) for i in range(n)], "truncated": [False] * n,
            "answer": answers, "reward_model": [{"ground_truth": a} for a in answers],
            "prompt_texts": [f"<user>q{i}<assistant>" for i in range(n)],
            "query": [f"<user>q{i}<assistant>{t}<end>" for i, t in enumerate(texts)]}


@pytest.fixture(scope="module")
def server():
    """Our server, in this process, serving a TRL-style and a verl-style function."""
    fns, _ = R.load(f"final_answer_format,verl:{FNS}:verl_compute_score", (), False, 10)
    served = Served(reward_server.make_app(fns))
    yield served, fns
    served.close()


def test_a_served_function_scores_what_it_scores_locally(server):
    served, local = server
    f = load(served.url, batch=3, concurrency=2)   # 7 responses: 3 requests, 2 at a time
    assert f.name == f"remote_127_0_0_1_{served.port}_score"
    x = inputs(7)
    origin = [f"row {i}" for i in range(7)]
    remote, extras = R.call(f, x, origin)
    want = [R.call(g, x, origin) for g in local]
    np.testing.assert_array_equal(remote, want[0][0] + want[1][0])
    np.testing.assert_array_equal(extras["final_answer_format"], want[0][0])
    np.testing.assert_array_equal(extras["verl_verl_compute_score"], want[1][0])
    np.testing.assert_array_equal(extras["verl_verl_compute_score/acc"], want[1][1]["acc"])


def test_the_request_is_openrlhfs_and_an_openrlhf_reply_is_read():
    """What goes out: query, prompts and labels (OpenRLHF's fields, labels from
    reward_remote.labels) and our two extensions; a reply of "scores" with nulls is read."""
    seen = []

    async def handler(request):
        body = await request.json()
        seen.append(body)
        return web.json_response({"scores": [None if len(q) % 2 else 0.5 for q in body["query"]]})
    app = web.Application()
    app.router.add_post("/score", handler)
    served = Served(app)
    try:
        x = inputs(3)
        f = load(served.url, labels="answer")
        scores, _ = R.call(f, x, ["r0", "r1", "r2"], 1, R.TrainerState(4, 9))
    finally:
        served.close()
    check, body = seen               # the start-up check (an empty batch), then the batch
    assert check["query"] == []
    assert body["query"] == x["query"] and body["prompts"] == x["prompt_texts"]
    assert body["labels"] == x["answer"] and body["completions"] == x["completions"]
    assert body["columns"]["reward_model"] == x["reward_model"]
    assert body["columns"]["prompts"] == x["prompts"]       # TRL's, as the data has them
    assert body["trainer_state"] == {"global_step": 4, "max_steps": 9, "epoch": 0.0}
    want = [np.nan if len(q) % 2 else 0.5 for q in x["query"]]
    np.testing.assert_array_equal(scores, want)


def test_failures_are_retried_with_backoff_then_stop_with_one_line():
    calls = []

    async def flaky(request):        # two 503s, then an answer (the start-up check aside)
        body = await request.json()
        if body["query"]:
            calls.append(time.monotonic())
        if 0 < len(calls) <= 2:
            return web.Response(status=503, text="warming up")
        return web.json_response({"rewards": [1.0] * len(body["query"])})

    async def slow(request):         # answers the start-up check, then takes 2 s a batch
        body = await request.json()
        await asyncio.sleep(2 if body["query"] else 0)
        return web.json_response({"rewards": [1.0] * len(body["query"])})

    async def refusing(request):     # a 4xx is the request's fault: not retried
        return web.Response(status=404, text="no such path")
    app = web.Application()
    app.router.add_post("/flaky", flaky)
    app.router.add_post("/slow", slow)
    app.router.add_post("/refusing", refusing)
    served = Served(app)
    base = served.url.rsplit("/", 1)[0]
    x = inputs(2)
    try:
        scores, _ = R.call(load(f"{base}/flaky", retries=2), x, ["r0", "r1"])
        np.testing.assert_array_equal(scores, [1, 1])
        assert len(calls) == 3
        gaps = np.diff(calls)            # 0.5 s, then 1 s
        assert gaps[0] >= RR.BACKOFF_S and gaps[1] >= 2 * RR.BACKOFF_S
        with pytest.raises(R.RewardError, match=r"failed after 2 attempt\(s\): TimeoutError"):
            R.call(load(f"{base}/slow", retries=1, timeout_s=0.2), x, ["r0", "r1"])
        with pytest.raises(R.RewardError, match=r"after 1 attempt\(s\): HTTP 404: no such path"):
            R.call(load(f"{base}/refusing", retries=3), x, ["r0", "r1"])
    finally:
        served.close()


def test_a_reply_of_the_wrong_length_names_the_server(server):
    async def short(request):
        return web.json_response({"rewards": [1.0]})
    app = web.Application()
    app.router.add_post("/score", short)
    served = Served(app)
    try:
        with pytest.raises(R.RewardError, match=r"answered 1 rewards for 2 responses"):
            R.call(load(served.url), inputs(2), ["r0", "r1"])
    finally:
        served.close()


def test_a_server_that_does_not_answer_is_a_start_up_error():
    with socket.socket() as s:     # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"reward server http://127.0.0.1:{port}/x does not "
                                          r"answer \(.*Connect"):
        load(f"http://127.0.0.1:{port}/x", retries=0)
    with pytest.raises(ValueError, match="needs a host"):
        parse_reward_specs("http:///score")
    (spec,) = parse_reward_specs("http://verifier.local:8000/score?x=1")
    assert spec.remote and spec.where == "http://verifier.local:8000/score?x=1"


def test_the_server_command_serves_and_stops_on_sigterm(capsys):
    """`python -m p3o_jax.cli.reward_server` as a user starts it: bad lists and taken ports
    are one line and exit 2; it serves a POST on any path; SIGTERM stops it with exit 0."""
    assert reward_server.main(["nosuch_builtin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nosuch_builtin" in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert reward_server.main(["final_answer_format", f"port={port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: serving on 127.0.0.1:{port} failed") and err.count("\n") == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "p3o_jax.cli.reward_server",
                             f"verl:{FNS}:verl_compute_score", f"port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("serving verl_verl_compute_score on ")
        f = load(f"http://127.0.0.1:{port}/anything")
        x = {"completions": ["#### 4", "#### 5"], "query": ["a", "b"], "prompt_texts": ["", ""],
             "prompts": ["", ""], "answer": ["4", "4"]}
        scores, _ = R.call(f, x, ["r0", "r1"])
        np.testing.assert_array_equal(scores, [1, 0])
    finally:
        proc.terminate()
        rc = proc.wait(timeout=30)
        assert rc == 0, (rc, proc.stderr.read())


def test_an_openrlhf_client_is_served(server):
    """OpenRLHF's own client (openrlhf/utils/remote_rm_utils.py, `request_api_wrapper`) POSTs
    only {"query": [...]} as JSON and reads "rewards": our server scores the whole query."""
    import urllib.request
    served, _ = server
    body = json.dumps({"query": ["<user>2+2?<assistant>so #### 4", "<user>2+2?<assistant>4"]})
    request = urllib.request.Request(served.url, body.encode(),
                                      {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=180) as reply:
        assert json.loads(reply.read())["rewards"] == [1.0, 0.0]
