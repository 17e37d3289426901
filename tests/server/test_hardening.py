"""Service hardening: health leaks, the Host check, strict params, downloads, tokens, folder
listings kept between requests (issue 12, part B)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import AUTH, TOKEN, FakeFactory, make_settings, png_bytes, submit

from engine.errors import ModelNotFound
from engine.server import create_app
from engine.server.auth import MIN_TOKEN_CHARS, TokenError, load_token
from engine.server.catalog import ModelCatalog
from engine.server.middleware import HostCheck, host_name

# --- /v1/health tells no secrets --------------------------------------------------------------


def _model_folder(parent: Path, name: str) -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionInstructPix2PixPipeline"})
    )
    return folder


def test_health_names_models_without_paths_and_hides_load_errors(tmp_path):
    secret_place = tmp_path / "home" / "painter" / "private-models"
    default = _model_folder(secret_place, "my-ip2p")
    other = _model_folder(secret_place / "listed", "second")

    def make(model, device):
        if model == str(other.resolve()):
            raise ModelNotFound(f"could not load the model folder {model}: broken", "model")
        return FakeFactory()(model, device)

    app = create_app(
        make_settings(model=str(default), models_dirs=(other.parent,)), editor_factory=make
    )
    with TestClient(app) as client:
        accepted = submit(client, {"instruction": "x", "steps": 1, "model": "second"})
        assert accepted.status_code == 202, accepted.text
        deadline = time.monotonic() + 10
        while True:
            answer = client.get("/v1/health")
            loads = {load["model"]: load for load in answer.json()["model_loads"]}
            if loads.get("second", {}).get("state") == "failed" and "my-ip2p" in loads:
                break
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.02)
        health = answer.json()
        assert str(tmp_path) not in answer.text and "painter" not in answer.text
        assert health["model"] == "my-ip2p" and health["loaded_models"] == ["my-ip2p"]
        failed = loads["second"]["error"]
        assert failed.startswith("failed to load model second") and "engine log" in failed
        # With the token, the full reason (which may quote paths) is shown.
        full = client.get("/v1/health", headers=AUTH).json()
        reasons = [load["error"] for load in full["model_loads"] if load["model"] == "second"]
        assert "broken" in reasons[0]
        wrong = client.get("/v1/health", headers={"Authorization": "Bearer not-the-token"})
        assert "broken" not in wrong.text


def test_health_instance_details_only_for_loopback_clients(tmp_path):
    settings = make_settings(token_file=tmp_path / "token")
    for address, local in (("127.0.0.1", True), ("::1", True), ("192.0.2.7", False)):
        with TestClient(
            create_app(settings, editor_factory=FakeFactory()), client=(address, 5)
        ) as c:
            instance = c.get("/v1/health").json()["instance"]
        assert (instance["token_file"] is not None) is local and (
            instance["pid"] is not None
        ) is local


# --- the Host header --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8765", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("localhost.:80", "localhost"),
        ("[::1]:8765", "::1"),
        ("[::1]", "::1"),
        ("example.com:x", None),
        ("[::1", None),
        ("", None),
    ],
)
def test_host_header_names(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("bound", "allowed", "accepted", "refused"),
    [
        (
            "127.0.0.1",
            (),
            ["127.0.0.1", "localhost", "::1", "127.0.0.2"],
            ["evil.example", "127.0.0.1.evil.example", "192.168.1.20", "localhost.evil"],
        ),
        ("::1", (), ["::1", "localhost", "127.0.0.1"], ["evil.example"]),
        (
            "192.168.1.20",
            ("studio.local",),
            ["192.168.1.20", "studio.local"],
            ["localhost", "evil.example", "10.0.0.1"],
        ),
        ("0.0.0.0", (), ["10.1.2.3", "127.0.0.1", "fe80::1", "localhost"], ["evil.example"]),
    ],
)
def test_host_check_accepts_only_this_servers_names(bound, allowed, accepted, refused):
    check = HostCheck(app=None, bound=bound, allowed=allowed)  # type: ignore[arg-type]
    assert all(check.accepts(name) for name in accepted)
    assert not any(check.accepts(name) for name in refused)


def test_a_foreign_host_header_is_refused_before_anything_else():
    settings = make_settings(allowed_hosts=())  # a real server's settings: bound to 127.0.0.1
    with TestClient(create_app(settings, editor_factory=FakeFactory())) as client:
        for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
            assert client.get("/v1/health", headers={"Host": host}).status_code == 200
        for path in ("/v1/health", "/v1/models", "/openapi.json"):
            refused = client.get(path, headers={"Host": "rebound.evil.example", **AUTH})
            assert refused.status_code == 421, path
            error = refused.json()["error"]
            assert error["field"] == "Host" and "--allowed-host" in error["message"]
        # TestClient's own name is refused too unless listed: the check is not a test artefact.
        assert client.get("/v1/health").status_code == 421


def test_allowed_host_names_pass_when_bound_elsewhere():
    settings = make_settings(host="192.168.1.20", allowed_hosts=("studio.local",))
    with TestClient(create_app(settings, editor_factory=FakeFactory())) as client:
        assert client.get("/v1/health", headers={"Host": "studio.local:8765"}).status_code == 200
        assert client.get("/v1/health", headers={"Host": "192.168.1.20"}).status_code == 200
        assert client.get("/v1/health", headers={"Host": "localhost"}).status_code == 421


# --- params: nesting and types ----------------------------------------------------------------


def test_deeply_nested_params_are_a_422_not_a_500(client_factory):
    client = client_factory()
    depth = 10_000
    for nested in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        params = '{"instruction": "x", "text_guidance": ' + nested + "}"
        answer = client.post(
            "/v1/edits",
            headers=AUTH,
            files={"image": ("i.png", png_bytes(), "image/png")},
            data={"params": params},
        )
        assert answer.status_code == 422, answer.text[:300]
        assert answer.json()["error"]["field"] in ("params", "text_guidance")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"preserve_detail": "no"}, "preserve_detail"),
        ({"preserve_detail": 0}, "preserve_detail"),
        ({"seed": "7"}, "seed"),
        ({"steps": 2.5}, "steps"),
        ({"variants": True}, "variants"),
        ({"model": 5}, "model"),
        ({"loras": None}, "loras"),
        ({"loras": {}}, "loras"),
        ({"loras": [{"path": 5}]}, "loras"),
        ({"loras": [{"path": "a.safetensors", "strength": "0.5"}]}, "loras"),
        ({"loras": [{"path": "a.safetensors", "strength": True}]}, "loras"),
        ({"loras": [{"path": "a.safetensors", "weight": 1}]}, "loras"),
        ({"text_guidance": "7.5"}, "text_guidance"),
        ({"scheduler": 3}, "scheduler"),
        ({"text_guidance": [7.5]}, "text_guidance"),
    ],
)
def test_every_field_is_type_checked(client_factory, params, field):
    client = client_factory()
    answer = submit(client, {"instruction": "x", **params})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == field


# --- downloads --------------------------------------------------------------------------------

UNCACHED_CATALOGUE_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"


def _uncached(model_id: str) -> bool:
    from engine.server.catalog import in_hf_cache

    return not in_hf_cache(model_id)


@pytest.mark.skipif(not _uncached(UNCACHED_CATALOGUE_MODEL), reason="the model is in this HF cache")
def test_a_request_never_starts_a_download_unless_allowed(client_factory):
    factory = FakeFactory()
    client = client_factory(factory)
    refused = submit(client, {"instruction": "x", "steps": 1, "model": UNCACHED_CATALOGUE_MODEL})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["field"] == "model" and "--allow-downloads" in error["message"]
    assert "hf download" in error["message"]
    assert all(model != UNCACHED_CATALOGUE_MODEL for model, _ in factory.loaded)
    # The operator's own default model is theirs to fetch: not refused.
    assert submit(client, {"instruction": "x", "steps": 1}).status_code == 202
    allowed = client_factory(FakeFactory(), allow_downloads=True)
    answer = submit(allowed, {"instruction": "x", "steps": 1, "model": UNCACHED_CATALOGUE_MODEL})
    assert answer.status_code == 202, answer.text


def test_a_preset_whose_lora_is_not_here_is_refused(client_factory):
    from engine.families import load_catalogue

    with_presets = [
        (entry["id"], preset["id"])
        for entry in load_catalogue()
        for preset in entry.get("presets") or []
        if preset.get("loras")
    ]
    if not with_presets:
        pytest.skip("no catalogue preset has LoRAs")
    model, preset = with_presets[0]
    client = client_factory(model=model)  # the default model: downloading it is allowed
    answer = submit(client, {"instruction": "x", "model": model, "preset": preset})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == "preset"
    assert "--allow-downloads" in answer.json()["error"]["message"]


def test_the_worker_loads_other_models_without_downloads(monkeypatch):
    """The backstop under the catalogue's check: the real editor factory narrows the load
    policy for any model but the operator's default."""
    import engine.editor
    from engine.server.workers import real_editor_factory
    from engine.sources import current_policy

    seen: dict[str, bool] = {}

    class RecordingEditor:
        def __init__(self, model, **kwargs):
            seen[model] = current_policy().allow_downloads

    monkeypatch.setattr(engine.editor, "Editor", RecordingEditor)
    make = real_editor_factory(make_settings(model="timbrooks/instruct-pix2pix"))
    make("timbrooks/instruct-pix2pix", "cpu")
    make("someone/else", "cpu")
    assert seen == {"timbrooks/instruct-pix2pix": True, "someone/else": False}
    allowing = real_editor_factory(make_settings(allow_downloads=True))
    allowing("someone/else", "cpu")
    assert seen["someone/else"] is True


def test_pretrained_does_not_download_when_the_policy_forbids(monkeypatch):
    from engine.errors import ModelNotFound
    from engine.sources import ModelSource, load_policy, pretrained

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[dict] = []

    class Pipeline:
        @classmethod
        def from_pretrained(cls, location, **kwargs):
            calls.append(kwargs)
            if kwargs.get("local_files_only"):
                raise OSError("not in the cache")
            return "downloaded"

    with (
        load_policy(allow_downloads=False),
        pytest.raises(ModelNotFound, match="--allow-downloads"),
    ):
        pretrained(Pipeline, ModelSource("hub", "someone/model"))
    assert all(call.get("local_files_only") for call in calls)
    assert all(call.get("use_safetensors") is True for call in calls)
    assert pretrained(Pipeline, ModelSource("hub", "someone/model")) == "downloaded"


# --- tokens -----------------------------------------------------------------------------------


def test_short_tokens_are_refused(tmp_path):
    with pytest.raises(TokenError, match=f"at least {MIN_TOKEN_CHARS}"):
        load_token("short-token", None)
    by_hand = tmp_path / "token"
    by_hand.write_text("hunter2\n")
    by_hand.chmod(0o600)
    with pytest.raises(TokenError, match=f"at least {MIN_TOKEN_CHARS}"):
        load_token(None, by_hand)
    assert load_token("x" * MIN_TOKEN_CHARS, None).token == "x" * MIN_TOKEN_CHARS


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_a_token_file_others_can_read_is_refused(tmp_path):
    shared = tmp_path / "token"
    shared.write_text(TOKEN)
    for mode in (0o644, 0o640, 0o604):
        shared.chmod(mode)
        with pytest.raises(TokenError, match=f"chmod 600 {shared}"):
            load_token(None, shared)
    shared.chmod(0o600)
    assert load_token(None, shared).token == TOKEN
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600  # never changed for the user


def _serve_args(tmp_path: Path, *extra: str):
    from engine.cli import build_parser

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    return build_parser().parse_args(
        ["serve", "--token-file", str(token_file), "--device", "cpu", *extra]
    )


def test_serving_off_loopback_without_tls_warns(tmp_path, capsys):
    from engine.server.cli import _settings_from_args

    settings, _ = _settings_from_args(
        _serve_args(tmp_path, "--host", "0.0.0.0", "--allowed-host", "studio.local")
    )
    assert settings.host == "0.0.0.0" and settings.allowed_hosts == ("studio.local",)
    assert not settings.allow_downloads
    warning = [line for line in capsys.readouterr().err.splitlines() if "TLS" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: serving on 0.0.0.0")
    _settings_from_args(_serve_args(tmp_path, "--allow-downloads"))  # loopback: no warning
    assert "warning" not in capsys.readouterr().err


def test_serve_flags_are_checked(tmp_path, monkeypatch):
    import torch

    from engine.server.cli import ServeError, _settings_from_args

    with pytest.raises(ServeError, match="--allowed-host"):
        _settings_from_args(_serve_args(tmp_path, "--allowed-host", "http://x/"))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ServeError, match=r"torch 2\.6"):
        _settings_from_args(_serve_args(tmp_path, "--allow-pickle"))


# --- folder listings --------------------------------------------------------------------------


def test_folder_listings_are_kept_between_requests(client_factory, tmp_path, monkeypatch):
    import engine.server.catalog as catalog_module

    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    (loras / "styles" / "ink.safetensors").write_bytes(b"x")
    models = tmp_path / "models"
    models.mkdir()
    client = client_factory(loras_dirs=(loras,), models_dirs=(models,))
    assert client.get("/v1/models", headers=AUTH).status_code == 200  # the first listing
    walks: list[object] = []
    iterdirs: list[object] = []
    real_walk, real_iterdir = os.walk, Path.iterdir
    monkeypatch.setattr(
        catalog_module.os, "walk", lambda *a, **k: walks.append(a) or real_walk(*a, **k)
    )
    monkeypatch.setattr(Path, "iterdir", lambda self: iterdirs.append(self) or real_iterdir(self))
    for _ in range(10):
        assert client.get("/v1/health").status_code == 200
        lora = {"path": "styles/ink.safetensors", "strength": 0.5}
        assert submit(client, {"instruction": "x", "steps": 1, "loras": [lora]}).status_code == 202
    assert client.get("/v1/models", headers=AUTH).json()["loras"] == ["styles/ink.safetensors"]
    assert walks == [] and [p for p in iterdirs if p == models] == []


def test_a_new_lora_or_model_appears_without_a_restart(tmp_path):
    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    models = tmp_path / "models"
    models.mkdir()
    catalog = ModelCatalog(
        "timbrooks/instruct-pix2pix", (models,), (loras,), catalogue=[], rescan_s=0.5
    )
    assert catalog.loras() == {}
    (loras / "styles" / "new.safetensors").write_bytes(b"x")  # a folder's mtime changes
    assert list(catalog.loras()) == ["styles/new.safetensors"]
    # A model folder being copied: listed once its model_index.json is there, which changes
    # no listed folder's mtime, so it shows at the latest after rescan_s.
    (models / "copied").mkdir()
    assert [e.id for e in catalog.entries() if e.source == "models-dir"] == []
    (models / "copied" / "model_index.json").write_text("{}")
    time.sleep(0.55)
    assert [e.id for e in catalog.entries() if e.source == "models-dir"] == ["copied"]


def test_a_missing_name_rescans_at_most_once_a_second(tmp_path):
    from engine.errors import InvalidInput

    models = tmp_path / "models"
    models.mkdir()
    catalog = ModelCatalog("timbrooks/instruct-pix2pix", (models,), catalogue=[], rescan_s=60)
    catalog.entries()
    stamp = models.stat().st_mtime_ns
    (models / "fresh.safetensors").write_bytes(b"x")
    os.utime(models, ns=(stamp, stamp))  # a change no mtime shows (coarse file systems)
    with pytest.raises(InvalidInput, match="not offered"):
        catalog.resolve_model("fresh.safetensors")  # the listing is under a second old
    time.sleep(1.05)
    assert catalog.resolve_model("fresh.safetensors").source == "models-dir"


# --- a quiet service --------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_prints_no_library_notices(tmp_path, tiny_model_dir):
    """stderr of a serve that loaded a model: the token line, nothing from the libraries (they
    used to print torchao / transformers notices on every start)."""
    import subprocess

    import httpx

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    command = [sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--device", "cpu"]
    command += ["--model", str(tiny_model_dir), "--token-file", str(token_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("listening on ")
        deadline = time.monotonic() + 240
        while not httpx.get(f"{url}/v1/health", timeout=10).json()["loaded_models"]:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.2)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert stderr.strip().splitlines() == [f"token file: {token_file}"], stderr
