"""The service with the real Editor on a tiny saved model, in process."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import AUTH, decode, make_settings, png_bytes, submit, wait_finished

from engine.editor import Editor
from engine.request import EditParams
from engine.server import create_app


@pytest.fixture
def real_client(tiny_model_dir):
    app = create_app(make_settings(model=str(tiny_model_dir), dtype="fp32"))
    with TestClient(app) as client:
        yield client


@pytest.mark.slow
def test_service_result_equals_a_direct_edit(real_client, tiny_model_dir):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    params = {"instruction": "make it red", "steps": 2, "resolution": 64, "seed": 3, "variants": 2}
    job_id = submit(real_client, params, buffer.getvalue()).json()["id"]
    status = wait_finished(real_client, job_id, timeout=60)
    assert status["state"] == "done", status
    served = [
        np.asarray(decode(real_client.get(f"/v1/edits/{job_id}/results/{k}", headers=AUTH).content))
        for k in range(2)
    ]
    direct = Editor(tiny_model_dir, device="cpu", dtype="fp32").edit(image, EditParams(**params))
    for got, expected in zip(served, direct, strict=True):
        assert got.shape == (48, 64, 3)
        np.testing.assert_array_equal(got, np.asarray(expected))
    assert not np.array_equal(served[0], served[1]), "variants should differ (seed + k)"


def test_real_edit_can_be_cancelled_mid_run(real_client):
    job_id = submit(
        real_client, {"instruction": "x", "steps": 200, "resolution": 64}, png_bytes((64, 64))
    ).json()["id"]
    deadline = time.monotonic() + 30
    while real_client.get(f"/v1/edits/{job_id}", headers=AUTH).json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    real_client.delete(f"/v1/edits/{job_id}", headers=AUTH)
    status = wait_finished(real_client, job_id, timeout=30)
    assert status["state"] == "cancelled" and status["progress"]["step"] < 200


def test_raw_layer_and_soft_mask_outside_pixels_come_back_exactly(real_client):
    rng = np.random.default_rng(1)
    layer = rng.integers(0, 256, (45, 67, 4), dtype=np.uint8)  # BGRA with partial alpha
    mask = np.zeros((45, 67), np.uint8)
    mask[8:30, 10:50] = 255
    mask[30:36, 10:50] = np.linspace(1, 254, 40, dtype=np.uint8)  # a feathered edge
    raw = "image/x-raw; format={}; width=67; height=45"
    accepted = real_client.post(
        "/v1/edits",
        headers=AUTH,
        files={
            "image": ("layer", layer.tobytes(), raw.format("bgra8")),
            "mask": ("selection", mask.tobytes(), raw.format("gray8")),
        },
        data={"params": '{"instruction": "make it red", "steps": 2, "resolution": 64}'},
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    assert wait_finished(real_client, job_id, timeout=60)["state"] == "done"
    answer = real_client.get(f"/v1/edits/{job_id}/results/0?format=bgra8", headers=AUTH)
    result = np.frombuffer(answer.content, np.uint8).reshape(45, 67, 4)
    assert np.array_equal(result[mask == 0], layer[mask == 0])
    assert (result[mask == 255] != layer[mask == 255]).any(), "the masked area was edited"
