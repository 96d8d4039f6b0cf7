"""Micro-batching through the HTTP API: concurrent requests with the same key share one forward pass and each gets
the samples it would get alone for its seed; the queue is bounded; inference runs off the event loop.

No timing assumptions: a gate holds the worker inside a first ("plug") forward pass while the requests under test
queue up, so which requests share a pass is decided by the code, not by the clock.
"""

import asyncio
import json
import threading

import pytest
import torch

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from jumpflow.serve import MicroBatcher, QueueFull, create_app  # noqa: E402


class Gate:
    """Wraps run_batch: the first call waits until `release` is set (the plug), later calls pass straight through."""

    def __init__(self, run_batch):
        self.run_batch, self.entered, self.release, self.calls = run_batch, threading.Event(), threading.Event(), 0

    def __call__(self, key, payloads):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(30), "the test never released the gate"
        return self.run_batch(key, payloads)


class ForwardCounter:
    """Counts the network's forward passes and their batch sizes (a forward hook on the model's net)."""

    def __init__(self, net):
        self.sizes = []
        self.handle = net.register_forward_hook(lambda module, args, out: self.sizes.append(args[0].shape[0]))

    def close(self):
        self.handle.remove()


async def until(condition, what: str):
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def run_behind_plug(app, bodies, plug_body=None, extra=None):
    """Send a plug request, hold it in the worker, queue `bodies` concurrently, release, return all responses
    (plug first). `extra(client)` runs while the worker is held."""
    batcher = app.state.batcher
    gate = batcher.run_batch = Gate(batcher.run_batch)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            post = lambda body: asyncio.ensure_future(client.post("/generate", json=body))  # noqa: E731
            plug = post(plug_body or {"n": 1, "seed": 0, "steps": 3, "format": "json"})
            await until(gate.entered.is_set, "the plug to reach the worker")
            tasks = [post(body) for body in bodies]
            await until(lambda: batcher.waiting == len(bodies), "the requests to queue")
            held = await extra(client) if extra else None
            gate.release.set()
            return await asyncio.gather(plug, *tasks), held

    return asyncio.run(scenario())


BODIES = [{"n": 3, "seed": 1, "steps": 1}, {"n": 5, "seed": 2, "steps": 1}, {"n": 1, "seed": 3, "steps": 1},
          {"n": 4, "seed": 4, "steps": 2}, {"n": 2, "seed": 5, "steps": 2}]


def test_concurrent_requests_with_the_same_key_share_one_forward_pass(vector_model):
    app = create_app(vector_model, batch_window_ms=0.0)
    expected = [vector_model.generate(b["n"], steps=b["steps"], seed=b["seed"]) for b in BODIES]
    counter = ForwardCounter(vector_model.net)

    async def health_while_busy(client):  # the event loop answers while the worker computes
        return (await client.get("/health")).json()

    try:
        (plug, *responses), health = run_behind_plug(app, [{**b, "format": "json"} for b in BODIES],
                                                     extra=health_while_busy)
    finally:
        counter.close()
    assert health["status"] == "ok" and health["waiting"] == len(BODIES)
    assert plug.status_code == 200 and plug.headers["X-Batch-Requests"] == "1"
    # MeanFlow jumps once per step: plug (3 steps, 1 sample), steps=1 group (9 samples, one pass), steps=2 group
    # (6 samples, two jumps of one pass): 3 + 1 + 2 network calls instead of 3 + 3 + 2 * 2
    assert counter.sizes == [1, 1, 1, 9, 6, 6]
    assert app.state.batcher.forward_passes == 3
    for body, r, alone in zip(BODIES, responses, expected):
        assert r.status_code == 200
        assert r.headers["X-Batch-Requests"] == ("3" if body["steps"] == 1 else "2")
        torch.testing.assert_close(torch.tensor(r.json()["samples"]), alone, rtol=1e-5, atol=1e-6)


def test_without_batching_every_request_runs_alone_with_the_same_samples(vector_model):
    app = create_app(vector_model, batching=False)
    counter = ForwardCounter(vector_model.net)
    try:
        (_, *responses), _ = run_behind_plug(app, [{**b, "format": "json"} for b in BODIES])
    finally:
        counter.close()
    assert app.state.batcher.forward_passes == 1 + len(BODIES)
    assert counter.sizes == [1, 1, 1, 3, 5, 1, 4, 4, 2, 2]
    for body, r in zip(BODIES, responses):
        assert r.headers["X-Batch-Requests"] == "1"
        alone = vector_model.generate(body["n"], steps=body["steps"], seed=body["seed"])
        torch.testing.assert_close(torch.tensor(r.json()["samples"]), alone, rtol=1e-5, atol=1e-6)


def test_a_batch_never_exceeds_max_batch_samples(vector_model):
    app = create_app(vector_model, max_n=8, max_batch=10, batch_window_ms=0.0)
    bodies = [{"n": 6, "seed": k, "steps": 1, "format": "json"} for k in range(3)]
    (_, *responses), _ = run_behind_plug(app, bodies)
    assert [r.headers["X-Batch-Size"] for r in responses] == ["6", "6", "6"]  # 6 + 6 > 10: one request a pass
    assert app.state.batcher.forward_passes == 4


def test_a_full_queue_answers_503_and_the_queued_requests_still_complete(vector_model):
    app = create_app(vector_model, max_queue=2, batch_window_ms=0.0)

    async def one_too_many(client):
        return await client.post("/generate", json={"n": 1, "seed": 9})

    bodies = [{"n": 2, "seed": 1, "format": "json"}, {"n": 2, "seed": 2, "format": "json"}]
    (plug, *responses), refused = run_behind_plug(app, bodies, extra=one_too_many)
    assert refused.status_code == 503 and "queue limit 2" in refused.json()["error"]
    assert plug.status_code == 200 and [r.status_code for r in responses] == [200, 200]


def test_a_request_whose_client_left_is_not_computed():
    calls = []

    def run_batch(key, payloads):
        calls.append(list(payloads))
        return payloads

    async def scenario():
        batcher = MicroBatcher(run_batch, window_s=0.0)
        gate = batcher.run_batch = Gate(run_batch)
        plug = asyncio.ensure_future(batcher.submit("k", "plug"))
        await until(gate.entered.is_set, "the plug")
        gone = asyncio.ensure_future(batcher.submit("k", "gone"))
        kept = asyncio.ensure_future(batcher.submit("k", "kept"))
        await until(lambda: batcher.waiting == 2, "two queued")
        gone.cancel()
        gate.release.set()
        results = await asyncio.gather(plug, kept)
        await batcher.close()
        return [r.value for r in results], [r.batch_requests for r in results]

    values, merged = asyncio.run(scenario())
    assert values == ["plug", "kept"] and merged == [1, 1]
    assert calls == [["plug"], ["kept"]]


def test_the_batcher_refuses_when_full_and_checks_its_settings():
    async def scenario():
        gate = Gate(lambda key, payloads: payloads)
        batcher = MicroBatcher(gate, max_queue=1, max_batch=4)
        plug = asyncio.ensure_future(batcher.submit("k", 0))
        await until(gate.entered.is_set, "the plug")
        queued = asyncio.ensure_future(batcher.submit("k", 1))
        await until(lambda: batcher.waiting == 1, "one queued")
        with pytest.raises(QueueFull, match="queue limit 1"):
            await batcher.submit("k", 2)
        with pytest.raises(ValueError, match="never fit"):
            await batcher.submit("k", 3, size=5)
        gate.release.set()
        await asyncio.gather(plug, queued)
        await batcher.close()

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        MicroBatcher(lambda key, payloads: payloads, window_s=-1.0)


def test_a_request_abandoned_by_its_client_is_dropped_before_it_runs(vector_model):
    """The page aborts a request a newer one made stale; the server then never computes it."""
    app = create_app(vector_model, batch_window_ms=0.0)
    batcher = app.state.batcher
    gate = batcher.run_batch = Gate(batcher.run_batch)
    body = json.dumps({"n": 2, "seed": 1, "steps": 1}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 9), "server": ("serve", 80)}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            plug = asyncio.ensure_future(client.post("/generate", json={"n": 1, "seed": 0, "steps": 3}))
            await until(gate.entered.is_set, "the plug")
            gone, messages, sent = asyncio.Event(), [{"type": "http.request", "body": body, "more_body": False}], []

            async def receive():
                if messages:
                    return messages.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            stale = asyncio.ensure_future(app(scope, receive, send))
            await until(lambda: batcher.waiting == 1, "the stale request to queue")
            gone.set()  # the client goes away while its request waits
            await asyncio.wait_for(stale, 30)
            gate.release.set()
            return (await plug).status_code, sent

    plug_status, sent = asyncio.run(scenario())
    assert plug_status == 200 and sent[0]["status"] == 204
    assert gate.calls == 1 and batcher.requests_served == 1  # only the plug was computed
