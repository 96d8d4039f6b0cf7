"""The HTTP API in-process: what /model says, that /generate returns the model's own samples for a seed, and that
every bad request is a 4xx JSON error with a message (never a 500 with a traceback)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from jumpflow.errors import JumpflowError  # noqa: E402
from jumpflow.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def vector_client(vector_model, teacher_model):
    with TestClient(create_app(vector_model, teacher_model, max_n=256)) as client:
        yield client


@pytest.fixture(scope="module")
def digits_client(digits_model):
    with TestClient(create_app(digits_model, max_n=64)) as client:
        yield client


def test_health_and_model_card_describe_the_served_models(vector_client, digits_client):
    assert vector_client.get("/health").json()["status"] == "ok"
    card = vector_client.get("/model").json()
    assert card["method"] == "meanflow" and card["data"] == {"name": "8gaussians", "kind": "vector", "shape": [2]}
    assert card["classes"] == 0 and card["guidance"] is False and card["max_n"] == 256
    assert card["supported_steps"][:3] == [1, 2, 4] and card["default_steps"] == 1
    assert card["teacher"]["method"] == "flow_matching" and card["teacher"]["steps"] == 100
    digits = digits_client.get("/model").json()
    assert digits["classes"] == 10 and digits["guidance"] is True and digits["teacher"] is None
    assert digits["data"]["kind"] == "image" and digits["data"]["shape"] == [1, 8, 8]
    assert 100 in digits["supported_steps"]  # flow matching's own default step count is offered


def test_json_samples_are_the_models_own_samples_for_the_seed(vector_client, vector_model):
    r = vector_client.post("/generate", json={"n": 7, "steps": 2, "seed": 11, "format": "json"})
    assert r.status_code == 200 and r.headers["X-Seed"] == "11" and float(r.headers["X-Generation-Ms"]) > 0
    body = r.json()
    assert body["shape"] == [7, 2] and body["steps"] == 2
    expected = vector_model.generate(7, steps=2, seed=11)
    torch.testing.assert_close(torch.tensor(body["samples"]), expected, rtol=1e-5, atol=1e-6)
    other = vector_client.post("/generate", json={"n": 7, "steps": 2, "seed": 12, "format": "json"}).json()
    assert not torch.equal(torch.tensor(other["samples"]), torch.tensor(body["samples"]))


def test_a_request_without_seed_gets_one_that_reproduces_it(vector_client):
    first = vector_client.post("/generate", json={"n": 5, "format": "json"})
    seed = int(first.headers["X-Seed"])
    again = vector_client.post("/generate", json={"n": 5, "seed": seed, "format": "json"})
    assert again.json()["samples"] == first.json()["samples"]


def test_teacher_samples_at_100_steps(vector_client, teacher_model):
    r = vector_client.post("/generate", json={"model": "teacher", "n": 4, "seed": 3, "format": "json"})
    assert r.status_code == 200 and r.headers["X-Steps"] == "100"
    torch.testing.assert_close(torch.tensor(r.json()["samples"]), teacher_model.generate(4, steps=100, seed=3),
                               rtol=1e-5, atol=1e-6)


def test_png_is_a_scatter_for_vectors_and_a_grid_for_images(vector_client, digits_client, digits_model):
    scatter = Image.open(io.BytesIO(vector_client.post("/generate", json={"n": 200, "seed": 0}).content))
    assert scatter.format == "PNG" and scatter.size[0] == scatter.size[1] >= 200
    pixels = torch.from_numpy(np.asarray(scatter.convert("L"), dtype=np.float32))
    assert (pixels < 200).sum() > 200  # dots were drawn on the white frame
    r = digits_client.post("/generate", json={"n": 16, "seed": 4, "steps": 2, "class": 3, "guidance": 2.0})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    grid = Image.open(io.BytesIO(r.content))
    assert grid.size == (4 * 9 + 1, 4 * 9 + 1)  # 4 x 4 digits of 8 x 8 pixels, 1-pixel borders
    samples = digits_model.generate(16, steps=2, seed=4, cls=3, guidance=2.0)
    first = torch.from_numpy(np.asarray(grid.convert("L").crop((1, 1, 9, 9)), dtype=np.float32))
    expected = samples[0, 0].clamp(-1, 1).add(1).mul(127.5).round()
    assert (first - expected).abs().max() <= 1  # the grid shows the model's samples for that seed and class


def test_class_and_guidance_change_the_samples(digits_client):
    def samples(**fields):
        return digits_client.post("/generate", json={"n": 3, "seed": 1, "steps": 2, "format": "json",
                                                     **fields}).json()["samples"]

    assert samples(**{"class": 1}) != samples(**{"class": 2})
    assert samples(**{"class": 1, "guidance": 3.0}) != samples(**{"class": 1})


BAD_VECTOR_REQUESTS = [
    ({"n": 0}, "n must be in [1, 256]"),
    ({"n": 257}, "n must be in [1, 256]"),
    ({"n": 2.5}, "n must be an integer"),
    ({"n": "4"}, "n must be an integer"),
    ({"steps": 0}, "steps 0 is not supported"),
    ({"steps": 10 ** 30}, "is not supported"),
    ({"seed": -1}, "seed must be in"),
    ({"class": 1}, "unconditional; it takes no class"),
    ({"guidance": 2.0}, "takes no guidance"),
    ({"format": "gif"}, "format must be one of png, json"),
    ({"model": "other"}, "model must be one of"),
    ({"nn": 4}, "unknown field(s) 'nn'"),
]
BAD_DIGITS_REQUESTS = [
    ({"class": 10}, "class must be in [0, 9]"),
    ({"class": -1}, "class must be in [0, 9]"),
    ({"class": 1, "guidance": "high"}, "guidance must be a number"),
    ({"class": 1, "guidance": 1e9}, "guidance must be a number in"),
    ({"guidance": 2.0}, "give a class with it"),
    ({"model": "teacher"}, "no teacher is attached"),
]


@pytest.mark.parametrize("body, message", BAD_VECTOR_REQUESTS)
def test_bad_requests_to_a_2d_model_are_4xx_with_a_message(vector_client, body, message):
    r = vector_client.post("/generate", json=body)
    assert r.status_code == 400 and message in r.json()["error"]


@pytest.mark.parametrize("body, message", BAD_DIGITS_REQUESTS)
def test_bad_requests_to_a_conditional_model_are_4xx_with_a_message(digits_client, body, message):
    r = digits_client.post("/generate", json=body)
    assert r.status_code == 400 and message in r.json()["error"]


@pytest.mark.parametrize("content, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b'{"n": NaN}', 400, "n must be an integer"),
    (b"[" * 100_000, 413, "request body over"),
])
def test_malformed_bodies_are_4xx(vector_client, content, status, message):
    r = vector_client.post("/generate", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]


def test_unknown_routes_and_methods_are_json_errors(vector_client):
    assert vector_client.get("/nope").status_code == 404 and "error" in vector_client.get("/nope").json()
    r = vector_client.get("/generate")
    assert r.status_code == 405 and "GET /generate" in r.json()["error"]


def test_a_refusal_from_inside_the_model_is_a_400_and_a_crash_a_500_without_traceback(vector_model):
    def refuse(key, payloads):
        raise JumpflowError("steps must be even here")

    def crash(key, payloads):
        raise RuntimeError("CUDA out of memory")

    app = create_app(vector_model)
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.batcher.run_batch = refuse
        r = client.post("/generate", json={"n": 2})
        assert r.status_code == 400 and r.json() == {"error": "steps must be even here"}
        app.state.batcher.run_batch = crash
        r = client.post("/generate", json={"n": 2})
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"] and "Traceback" not in r.text
        assert client.get("/health").json()["status"] == "ok"  # the server goes on


def test_the_page_is_self_contained_html(vector_client):
    r = vector_client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for element in ('id="seed"', 'id="steps"', 'id="class"', 'id="guidance"', 'id="samples"', 'id="gen-time"'):
        assert element in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere (offline machines)
    assert "AbortController" in html and "X-Generation-Ms" in html


def test_settings_that_cannot_work_are_refused(vector_model, digits_model):
    with pytest.raises(JumpflowError, match="max_n <= max_batch"):
        create_app(vector_model, max_n=100, max_batch=10)
    with pytest.raises(JumpflowError, match="batching settings"):
        create_app(vector_model, batch_window_ms=-1)
    with pytest.raises(JumpflowError, match="same data"):
        create_app(vector_model, teacher=digits_model)
