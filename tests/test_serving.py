"""The OpenAI-compatible server with the plugin: one real `drllm serve` on loopback.

One server (real default model, fp32) serves every test in this module; the
clients are the official `openai` package and plain HTTP. Bad checkpoints
are started with `vllm serve` in subprocesses and must fail with one line.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import MAX_MODEL_LEN, make_llm, shutdown

L = 30
BIN = Path(sys.executable).parent
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 7 times 8?",
    "Name three colours of the rainbow.",
    "Why do cats purr?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`drllm serve` on a free loopback port; yields (base_url, log path)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_PLUGINS", None)  # drllm serve turns on its endpoint plugin itself
    # the checkpoint the other engine tests use (every layer may skip and repeat)
    cmd = [str(BIN / "drllm"), "serve", "--checkpoint", str(checkpoint),
           "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    with open(log, "w") as out:
        # its own process group: teardown stops the engine core and worker too
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 420 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group (vLLM ignores SIGTERM while starting)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def client(server, checkpoint):
    from openai import OpenAI

    c = OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=120)
    c.model_name = str(checkpoint)
    return c


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body: str | dict) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(client, prompt: str, xargs: dict | None = None, max_tokens: int = 4, **kw):
    return client.chat.completions.create(
        model=client.model_name, messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens, temperature=0, extra_body={"vllm_xargs": xargs or {}}, **kw)


def reported(response) -> dict:
    """The Dr.LLM report the server put in the response's kv_transfer_params."""
    return response.model_extra["kv_transfer_params"]["drllm"]


def test_startup_prints_model_routers_and_settings(server, checkpoint):
    log = server[1].read_text()
    assert f"drllm serve: model {checkpoint}" in log
    assert re.search(r"drllm serve: routers .*routers.safetensors: 30 layers", log)
    # on CPU the served engine compiles, as plain `vllm serve` does
    assert re.search(r"Dr.LLM checkpoint .*in force: exact prefix caching \(salted by "
                     r"schedule\), chunked prefill \(routing windows whole, clamped to \d+ "
                     r"tokens\), compiled layers \(one shared graph\)", log)


def test_openai_chat_completion_and_streaming(server, client):
    url = server[0]
    xargs = {"drllm_bias": 0.3}
    whole = chat(client, PROMPTS[0], xargs, max_tokens=8)
    report = reported(whole)
    assert len(report["schedule"]) == L and set(report["schedule"]) <= {0, 1, 2}
    assert report["layer_applications"] == sum(report["schedule"])
    assert get(f"{url}/drllm/requests/{whole.id}")["schedule"] == report["schedule"]

    text = client.completions.create(
        model=client.model_name, prompt="The capital of France is", max_tokens=4,
        temperature=0, extra_body={"vllm_xargs": {"drllm_mode": "full"}})
    assert text.choices[0].text and reported(text)["schedule"] == [1] * L
    assert get(f"{url}/drllm/requests/{text.id}")["layer_applications"] == L

    chunks = list(chat(client, PROMPTS[0], xargs, max_tokens=8, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    # streaming responses carry no kv_transfer_params: the endpoint has the schedule
    assert get(f"{url}/drllm/requests/{chunks[0].id}")["schedule"] == report["schedule"]


def test_full_mode_text_equals_plain_vllm(client):
    from vllm import SamplingParams

    from drllm_vllm.checkpoint import cache_dir

    served = [chat(client, p, {"drllm_mode": "full"}, max_tokens=16).choices[0].message.content
              for p in PROMPTS[:3]]
    # plain vLLM eager, without prefix caching as the server runs; in fp32 the
    # server's compiled forward and eager give the same greedy tokens
    plain = make_llm(cache_dir() / "base" / "smollm2-135m-instruct", enforce_eager=True,
                     enable_prefix_caching=False)
    try:
        outs = plain.chat([[{"role": "user", "content": p}] for p in PROMPTS[:3]],
                          SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    finally:
        shutdown(plain)
    assert served == [o.outputs[0].text for o in outs]


def _mixed_requests() -> list[tuple[str, str, dict]]:
    """25 distinct (endpoint, prompt, controls), mixed modes, biases and forced schedules."""
    rng = random.Random(0)
    controls = [
        {},
        {"drllm_bias": -0.5},
        {"drllm_bias": 0.7},
        {"drllm_mode": "full"},
        {"drllm_mode": "schedule", "drllm_schedule": [rng.choice((0, 1, 2)) for _ in range(L)]},
    ]
    return [("chat" if (i + j) % 2 else "completion", p, c)
            for i, p in enumerate(PROMPTS) for j, c in enumerate(controls)]


def _send(client, endpoint: str, prompt: str, xargs: dict) -> list[int]:
    if endpoint == "chat":
        return reported(chat(client, prompt, xargs))["schedule"]
    r = client.completions.create(model=client.model_name, prompt=prompt, max_tokens=4,
                                  temperature=0, extra_body={"vllm_xargs": xargs})
    return reported(r)["schedule"]


def test_100_concurrent_mixed_requests_report_the_schedules_they_get_alone(client):
    distinct = _mixed_requests()
    alone = [_send(client, *r) for r in distinct]
    for (_, _, xargs), schedule in zip(distinct, alone):
        if xargs.get("drllm_mode") == "schedule":
            assert schedule == xargs["drllm_schedule"]
        if xargs.get("drllm_mode") == "full":
            assert schedule == [1] * L
    order = [i for i in range(len(distinct)) for _ in range(4)]
    random.Random(1).shuffle(order)
    with ThreadPoolExecutor(16) as pool:  # errors raise here
        together = list(pool.map(lambda i: _send(client, *distinct[i]), order))
    assert len(together) == 100
    mismatched = [(distinct[i], s) for i, s in zip(order, together) if s != alone[i]]
    assert not mismatched


def test_stats_endpoint_and_metrics_count_finished_requests(server, client):
    url = server[0]
    before = get(f"{url}/drllm/stats")
    forced = [2] * 3 + [0] * 7 + [1] * 20
    for xargs in ({"drllm_mode": "schedule", "drllm_schedule": forced}, {"drllm_mode": "full"}):
        chat(client, PROMPTS[1], xargs, max_tokens=2)
    after = get(f"{url}/drllm/stats")
    assert after["requests"] == before["requests"] + 2 and after["num_layers"] == L
    for layer, (b, a) in enumerate(zip(before["layers"], after["layers"])):
        delta = {k: a[k] - b[k] for k in ("skip", "execute", "repeat")}
        expected = {"skip": 0, "execute": 1, "repeat": 0}
        expected[("skip", "execute", "repeat")[forced[layer]]] += 1
        assert delta == expected, layer
    total = (before["mean_layer_applications"] or 0) * before["requests"] + sum(forced) + L
    assert after["mean_layer_applications"] == pytest.approx(total / after["requests"])

    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    requests = float(re.search(r"^drllm_requests_total (\S+)$", metrics, re.M).group(1))
    assert requests == after["requests"]
    assert re.search(r'^drllm_layer_actions_total\{action="repeat",layer="0"\} \S+$', metrics, re.M)
    assert re.search(r"^drllm_layer_applications_count \S+$", metrics, re.M)


def _good_chat(model, **xargs):
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2, "vllm_xargs": xargs}


SCHEDULE = {"drllm_mode": "schedule"}
# (endpoint, body with {model} filled in later, expected status, message pattern)
BAD_INPUTS = {
    "unknown mode": ("chat", dict(drllm_mode="fast"), r"drllm_mode = 'fast'.*routed.*full.*schedule"),
    "bias out of range": ("chat", dict(drllm_bias=3), r"drllm_bias = 3 .*\[-1, 1\]"),
    "bias not a number": ("chat", dict(drllm_bias="high"), r"drllm_bias = 'high'"),
    "schedule too short": ("chat", dict(SCHEDULE, drllm_schedule=[1, 1]),
                           r"drllm_schedule must have one entry per decoder layer \(30\), got 2"),
    "schedule value 3": ("chat", dict(SCHEDULE, drllm_schedule=[1] * 29 + [3]),
                         r"drllm_schedule\[29\] = 3.*0 \(skip\)"),
    "schedule value -1": ("completion", dict(SCHEDULE, drllm_schedule=[-1] + [1] * 29),
                          r"drllm_schedule\[0\] = -1"),
    "schedule value 1.5": ("chat", dict(SCHEDULE, drllm_schedule=[1.5] + [1] * 29),
                           r"drllm_schedule\[0\] = 1.5 is not an action"),
    "schedule a string": ("chat", dict(SCHEDULE, drllm_schedule="111"),
                          r"drllm_schedule must be a list of 30 ints.*'111'"),
    "schedule mode without schedule": ("completion", dict(SCHEDULE), r"needs drllm_schedule"),
    "schedule without schedule mode": ("chat", dict(drllm_schedule=[1] * L),
                                       r'only read with drllm_mode = "schedule"'),
    "route tokens 0": ("chat", dict(drllm_route_tokens=0), r"drllm_route_tokens = 0"),
    "unknown control": ("completion", dict(drllm_windows=4), r"unknown routing control.*drllm_windows"),
    "vllm_xargs not an object": ("chat", "fast", r"vllm_xargs.*valid dictionary"),
    "max_tokens not an int": ("completion", {"max_tokens": "abc"}, r"max_tokens.*valid integer"),
    "prompt over the model length": ("completion", {"prompt": "hello " * 600},
                                     r"maximum context length is 512 tokens"),
    "empty prompt": ("completion", {"prompt": ""}, r"prompt.*non-empty"),
    "empty conversation": ("chat", {"messages": []}, r"empty conversation"),
    "malformed JSON": ("chat", '{"model": ', r"JSON decode error"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_400_naming_the_value_and_the_server_stays_up(server, client, case):
    endpoint, spec, pattern = BAD_INPUTS[case]
    model = client.model_name
    path = f"{server[0]}/v1/" + ("chat/completions" if endpoint == "chat" else "completions")
    if isinstance(spec, str) and spec.startswith("{"):
        body = spec  # raw, malformed JSON
    elif isinstance(spec, dict) and not any(k.startswith("drllm_") for k in spec):
        base = ({"model": model, "messages": [{"role": "user", "content": "Hi"}]}
                if endpoint == "chat" else {"model": model, "prompt": "Hi"})
        body = {**base, "max_tokens": 2, **spec}  # a bad field of the request itself
    else:  # bad vllm_xargs
        body = ({"model": model, "messages": [{"role": "user", "content": "Hi"}]}
                if endpoint == "chat" else {"model": model, "prompt": "Hi"})
        body = {**body, "max_tokens": 2, "vllm_xargs": spec}
    status, answer = post(path, body)
    assert status == 400, answer
    assert re.search(pattern, answer["error"]["message"], re.S), answer["error"]["message"]
    status, ok = post(f"{server[0]}/v1/chat/completions", _good_chat(model, drllm_bias=0.2))
    assert status == 200 and len(ok["kv_transfer_params"]["drllm"]["schedule"]) == L


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_streamed_bad_input_is_a_400_before_the_stream(server, client, endpoint):
    model = client.model_name
    path = f"{server[0]}/v1/" + ("chat/completions" if endpoint == "chat" else "completions")
    body = ({"model": model, "messages": [{"role": "user", "content": "Hi"}]}
            if endpoint == "chat" else {"model": model, "prompt": "Hi"})
    status, answer = post(path, {**body, "max_tokens": 2, "stream": True,
                                 "vllm_xargs": {"drllm_bias": 1.5}})
    assert status == 400, answer
    assert re.search(r"drllm_bias = 1.5 .*\[-1, 1\]", answer["error"]["message"])


def test_bad_checkpoints_fail_startup_with_one_clear_line(checkpoint, tmp_path):
    from .test_validation import BAD_CHECKPOINTS, _copy

    cases = ["wrong router shape", "NaN router weights", "missing router file", "unknown drllm key"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    procs = {}
    for i, case in enumerate(cases):  # started together: each is mostly vLLM's import time
        (tmp_path / str(i)).mkdir()
        path = _copy(checkpoint, tmp_path / str(i))
        BAD_CHECKPOINTS[case][0](path)
        procs[case] = subprocess.Popen(
            [str(BIN / "vllm"), "serve", str(path), "--port", str(_free_port())],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for case, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode != 0, case
            assert "Traceback" not in out + err, (case, err[-2000:])
            last = err.strip().splitlines()[-1]
            assert last.startswith("drllm: error: "), (case, last)
            assert re.search(BAD_CHECKPOINTS[case][1], last), (case, last)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
