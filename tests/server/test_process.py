"""`instruct-edit serve` as a real process: start-up line, generated token, a real edit over
TCP with the tiny model, --parent-pid, and the refusals at start-up."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import png_bytes

from engine.server.instance import ENGINE_PACKAGE_DIR, install_id

LISTENING = re.compile(r"^listening on (https?://\S+)$")


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "serve", *args]


def child_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", XDG_STATE_HOME=str(tmp_path / "state"), OMP_NUM_THREADS="1")
    return env


def start_and_wait_for_url(process: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = LISTENING.match(line.strip())
        if match:
            return match.group(1)
        pytest.fail(f"unexpected stdout line before 'listening on': {line!r}")
    process.kill()
    pytest.fail(f"no listening line; stderr: {process.stderr.read() if process.stderr else ''}")


@pytest.mark.slow
def test_serve_process_edits_with_the_tiny_model_and_exits_with_its_parent(
    tmp_path, tiny_model_dir
):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    server = subprocess.Popen(
        serve_command(
            "--port",
            "0",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--parent-pid",
            str(parent.pid),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(tmp_path),
    )
    try:
        url = start_and_wait_for_url(server)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
        token_file = tmp_path / "state" / "instruct-edit" / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/v1/models").status_code == 401
            deadline = time.monotonic() + 60
            while client.get("/v1/health").json()["status"] == "loading":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert client.get("/v1/health").json()["status"] == "ok"
            accepted = client.post(
                "/v1/edits",
                headers=headers,
                files={"image": ("in.png", png_bytes((80, 48)), "image/png")},
                data={
                    "params": json.dumps(
                        {"instruction": "make it blue", "steps": 2, "resolution": 64}
                    )
                },
            )
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["id"]
            final = None
            with client.stream("GET", f"/v1/edits/{job_id}/events", headers=headers) as stream:
                for line in stream.iter_lines():
                    if line.startswith("event: ") and line[7:] != "progress":
                        final = line[7:]
            assert final == "done"
            result = client.get(f"/v1/edits/{job_id}/results/0", headers=headers)
            assert result.status_code == 200 and result.headers["content-type"] == "image/png"
            assert result.content.startswith(b"\x89PNG")
            # Raw pixels both ways, with the real Editor: no instruction, the same bytes back.
            health = client.get("/v1/health").json()
            assert health["instance"]["install_id"] == install_id(
                sys.executable, ENGINE_PACKAGE_DIR
            )
            assert health["instance"]["token_file"] == str(token_file.resolve())
            assert health["instance"]["pid"] == server.pid
            assert health["memory"][0]["device"] == "cpu" and health["memory"][0]["plan"] == "full"
            rng = np.random.default_rng(0)
            layer = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)  # partial alpha
            raw_type = "image/x-raw; format=bgra8; width=53; height=37"
            accepted = client.post(
                "/v1/edits",
                headers=headers,
                files={"image": ("layer", layer.tobytes(), raw_type)},
                data={"params": json.dumps({"instruction": ""})},
            )
            assert accepted.status_code == 202, accepted.text
            raw_id = accepted.json()["id"]
            deadline = time.monotonic() + 30
            while client.get(f"/v1/edits/{raw_id}", headers=headers).json()["state"] != "done":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            raw = client.get(f"/v1/edits/{raw_id}/results/0?format=bgra8", headers=headers)
            assert raw.headers["content-type"] == raw_type
            assert raw.content == layer.tobytes()
        # The Krita plugin passes its own pid: when it goes, the engine goes too.
        parent.kill()
        parent.wait()
        assert server.wait(timeout=15) == 0
        assert "parent process" in server.stderr.read()
        assert server.stdout.read() == "", "stdout must hold only the listening line"
    finally:
        for process in (parent, server):
            if process.poll() is None:
                process.kill()
                process.wait()


def run_serve_briefly(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        serve_command(*args), capture_output=True, text=True, timeout=60, env=child_env(tmp_path)
    )


def test_non_loopback_host_without_an_explicit_token_is_refused(tmp_path):
    done = run_serve_briefly(tmp_path, "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2
    assert "--token-file" in done.stderr and done.stdout == ""
    assert not (tmp_path / "state" / "instruct-edit" / "token").exists()


def test_start_up_errors_are_one_line_without_traceback(tmp_path):
    done = run_serve_briefly(tmp_path, "--port", "0", "--models-dir", str(tmp_path / "missing"))
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.strip().splitlines()[-1].startswith("error: folder")
        and "Traceback" not in done.stderr
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tls-cert", "cert.pem"], "--tls-key"),
        (["--models-dir", "missing"], "does not exist"),
        (["--parent-pid", "999999999"], "no such process"),
        (["--devices", "cpu,tpu"], "device must be one of"),
        (["--device", "cpu", "--dtype", "fp16"], "fp16"),
        (["--port", "70000"], "not a port"),
        (["--quantization", "bnb-4bit"], "bitsandbytes|CUDA"),  # no CUDA here (nor the package)
    ],
)
def test_bad_start_up_arguments_are_refused(tmp_path, monkeypatch, args, expected):
    from engine.cli import build_parser
    from engine.server.cli import ServeError, _settings_from_args, bind_listening_socket

    monkeypatch.chdir(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("secret-0123456789abcdef\n")
    token_file.chmod(0o600)
    parsed = build_parser().parse_args(["serve", "--token-file", str(token_file), *args])
    with pytest.raises(ServeError, match=expected):
        _settings_from_args(parsed)
        bind_listening_socket(parsed.host, parsed.port)


def test_a_busy_port_is_refused():
    from engine.server.cli import ServeError, bind_listening_socket

    taken = bind_listening_socket("127.0.0.1", 0)
    try:
        with pytest.raises(ServeError, match="choose another --port"):
            bind_listening_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate"
)
def test_tls_and_a_token_file_created_on_first_start(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    token_file = tmp_path / "private" / "token"
    server = subprocess.Popen(
        serve_command(
            "--port",
            "0",
            "--no-preload",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--token-file",
            str(token_file),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(tmp_path),
    )
    try:
        url = start_and_wait_for_url(server)
        assert url.startswith("https://127.0.0.1:")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        with httpx.Client(base_url=url, verify=str(cert), timeout=10) as client:
            assert client.get("/v1/health").json()["status"] == "ok"
            models = client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
            assert models.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/v1/health", timeout=5)
    finally:
        server.terminate()
        server.wait(10)
    assert token_file.read_text().strip() == token, "the server must not rewrite the token file"
