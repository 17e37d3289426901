"""Real Krita, end to end: the built plugin zip in a fresh profile, driving the docker.

Needs Debian's Krita (CI: `apt-get install -y --no-install-recommends krita python3-pyqt5
xvfb xauth`); skipped, with that reason, when `krita` is not installed. Krita runs under
Xvfb with a clean environment (no virtualenv on PATH); the plugin starts the real engine
(managed mode) from this virtualenv on a tiny model. krita_driver.py is the scenario.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import build_plugin  # noqa: E402
import install_plugin  # noqa: E402

APT = "apt-get install -y --no-install-recommends krita python3-pyqt5 xvfb xauth"

pytestmark = [
    pytest.mark.krita,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("krita") is None, reason=f"Krita is not installed ({APT})"),
    pytest.mark.skipif(shutil.which("xvfb-run") is None, reason=f"xvfb-run is not installed ({APT})"),
]

W, H = 256, 192
SEL = (96, 64, 64, 48)


@pytest.fixture(scope="module")
def krita_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    home = tmp_path_factory.mktemp("krita-home")
    data, config, runtime = home / "data", home / "config", home / "runtime"
    for folder in (data, config, runtime):
        folder.mkdir()
    runtime.chmod(0o700)
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    resources = data / "krita"

    # The plugin exactly as users get it: built zip -> installer -> enabled in kritarc.
    plugin_zip = build_plugin.build(home / "dist")
    install_plugin.install(plugin_zip, resources)
    kritarc = config / "kritarc"
    kritarc.write_text("[General]\nAutoSaveInterval=0\n", encoding="utf-8")
    install_plugin.enable_in_kritarc(kritarc)
    install_plugin.enable_in_kritarc(kritarc, "instruct_edit_e2e")
    assert "enable_instruct_edit=true" in kritarc.read_text()

    # The scenario plugin.
    pykrita = resources / "pykrita"
    (pykrita / "instruct_edit_e2e").mkdir()
    shutil.copy(Path(__file__).with_name("krita_driver.py"), pykrita / "instruct_edit_e2e" / "__init__.py")
    (pykrita / "instruct_edit_e2e.desktop").write_text(
        "[Desktop Entry]\nType=Service\nServiceTypes=Krita/PythonPlugin\n"
        "X-KDE-Library=instruct_edit_e2e\nX-Python-2-Compatible=false\nName=Instruct Edit e2e\n",
        encoding="utf-8")

    # Managed engine: this virtualenv, the tiny model, CPU.
    settings = {"engine_mode": "managed", "python_path": str(Path(sys.executable).parent.parent),
                "device": "cpu", "engine_model": str(tiny_model_dir)}
    (resources / "instruct_edit").mkdir(parents=True, exist_ok=True)
    (resources / "instruct_edit" / "settings.json").write_text(json.dumps(settings), encoding="utf-8")

    results = home / "results.json"
    env = {
        "HOME": str(home), "XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(config),
        "XDG_RUNTIME_DIR": str(runtime), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
        "E2E_RESULTS": str(results), "E2E_ARTIFACTS": str(artifacts),
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }
    command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24 -nolisten tcp", "krita", "--nosplash"]
    log = []
    # One retry, only when Krita died before the scenario began (no observation at all):
    # an X server / start-up hiccup, not a plugin failure.
    for attempt in range(2):
        try:
            completed = subprocess.run(command, env=env, cwd=home, capture_output=True, text=True,
                                       timeout=240)
            output = f"exit code {completed.returncode}\n{completed.stdout}{completed.stderr}"
        except subprocess.TimeoutExpired as err:
            output = f"TIMEOUT\n{err.stdout or ''}{err.stderr or ''}"
        log.append(f"--- attempt {attempt + 1} ---\n{output}")
        if results.exists():
            break
    (artifacts / "krita-e2e.log").write_text("\n".join(log))
    observed = json.loads(results.read_text()) if results.exists() else {}
    observed["_log_tail"] = "\n".join(log)[-3000:]
    return observed


def test_krita_scenario_ran(krita_run):
    assert "exception" not in krita_run, krita_run.get("exception")
    assert "timeout" not in krita_run, (krita_run.get("timeout"), krita_run["_log_tail"])
    assert krita_run.get("exit") == 0, krita_run["_log_tail"]


def test_docker_found_and_edit_done(krita_run):
    assert krita_run.get("docker_found") is True
    assert krita_run.get("job_state") == "done", krita_run.get("job_error")
    assert krita_run.get("error_after_click") == ""


def test_result_group_and_layers(krita_run):
    assert krita_run["top_names"] == [krita_run["source_name"], "make it evening"]
    assert krita_run["group_type"] == "grouplayer"
    assert krita_run["layer_names"] == ["seed 1234 · text 7.5 · image 1.5", "seed 1235 · text 7.5 · image 1.5"]
    assert krita_run["layer_visible"] == [True, False]
    x, y, w, h = SEL
    for bx, by, bw, bh in krita_run["layer_bounds"]:
        # Krita reports bounds of painted tiles: within the selection's context region.
        assert bx <= x and by <= y and bx + bw >= x + w and by + bh >= y + h
        assert bx >= 0 and by >= 0 and bx + bw <= W and by + bh <= H


def test_pixels_only_inside_selection_and_source_untouched(krita_run):
    assert krita_run["inside_alpha"] == [255]
    assert krita_run["opaque_pixels_outside_selection"] == 0
    assert krita_run["source_unchanged"] is True
    assert krita_run["provenance_seeds"] == [1234, 1235]
    assert "make it evening" in krita_run["docker_provenance"] and "seed 1234" in krita_run["docker_provenance"]


def test_one_undo_removes_the_edit(krita_run):
    assert krita_run["names_after_undo"] == [krita_run["source_name"]]
    assert krita_run["names_after_redo"] == [krita_run["source_name"], "make it evening"]


def test_provenance_survives_save_and_reopen(krita_run):
    assert krita_run["saved"] is True
    assert krita_run["reopened_records"] == 2
    records = list(krita_run["reopened_provenance"].values())
    assert all(r is not None for r in records), krita_run["reopened_provenance"]
    assert sorted(r["seed"] for r in records) == [1234, 1235]
    assert {r["instruction"] for r in records} == {"make it evening"}
    assert (ROOT / "artifacts" / "krita-e2e.png").exists()
