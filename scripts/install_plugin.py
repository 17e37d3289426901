"""Install the Instruct Edit plugin into a Krita profile and enable it.

    python scripts/install_plugin.py [--zip dist/instruct_edit-X.zip] [--resources DIR] [--config DIR]

Without --zip the plugin is taken from this checkout's plugin/ folder. Default locations:
  Linux:   ~/.local/share/krita (resources), ~/.config/kritarc
  Windows: %APPDATA%\\krita, %LOCALAPPDATA%\\kritarc
  macOS:   ~/Library/Application Support/krita, ~/Library/Preferences/kritarc
Files of an older Instruct Edit install are replaced; nothing else in the profile is touched.
kritarc gets `[python] enable_instruct_edit=true` (other settings kept as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_ID = "instruct_edit"


def default_resources() -> Path:
    if sys.platform == "win32":
        return Path(os.environ["APPDATA"]) / "krita"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "krita"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "krita"


def default_kritarc() -> Path:
    if sys.platform == "win32":
        return Path(os.environ["LOCALAPPDATA"]) / "kritarc"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Preferences" / "kritarc"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kritarc"


def enable_in_kritarc(kritarc: Path, plugin_id: str = PLUGIN_ID) -> None:
    """Set `enable_<id>=true` in the [python] section, keeping every other line."""
    lines = kritarc.read_text(encoding="utf-8").splitlines() if kritarc.exists() else []
    key = f"enable_{plugin_id}"
    out: list[str] = []
    section = None
    done = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if section == "[python]" and not done:
                out.append(f"{key}=true")
                done = True
            section = stripped
        elif section == "[python]" and stripped.split("=", 1)[0].strip() == key:
            if not done:
                out.append(f"{key}=true")
                done = True
            continue
        out.append(line)
    if not done:
        if section != "[python]":
            if out and out[-1].strip():
                out.append("")
            out.append("[python]")
        out.append(f"{key}=true")
    kritarc.parent.mkdir(parents=True, exist_ok=True)
    temporary = kritarc.with_name(kritarc.name + ".tmp")
    temporary.write_text("\n".join(out) + "\n", encoding="utf-8")
    temporary.replace(kritarc)


def install(source: Path, resources: Path) -> list[Path]:
    """Copy the plugin (a zip or the plugin/ folder) into resources/pykrita and actions/."""
    with tempfile.TemporaryDirectory() as scratch:
        if source.suffix == ".zip":
            with zipfile.ZipFile(source) as archive:
                for name in archive.namelist():
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise ValueError(f"{source} holds an unsafe path: {name}")
                archive.extractall(scratch)
            plugin_root = Path(scratch)
        else:
            plugin_root = source
        package = plugin_root / PLUGIN_ID
        desktop = plugin_root / f"{PLUGIN_ID}.desktop"
        if not package.is_dir() or not desktop.is_file():
            raise FileNotFoundError(f"{source} is not an Instruct Edit plugin (no {PLUGIN_ID}/ or .desktop)")
        pykrita = resources / "pykrita"
        pykrita.mkdir(parents=True, exist_ok=True)
        target = pykrita / PLUGIN_ID
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(desktop, pykrita / desktop.name)
        installed = [target, pykrita / desktop.name]
        manual = plugin_root / "manual.html"
        if manual.exists():
            shutil.copy2(manual, target / "manual.html")
        action = plugin_root / f"{PLUGIN_ID}.action"
        if action.exists():
            (resources / "actions").mkdir(parents=True, exist_ok=True)
            shutil.copy2(action, resources / "actions" / action.name)
            installed.append(resources / "actions" / action.name)
        return installed


def default_settings_file() -> Path:
    """Where the plugin keeps its settings: Qt's GenericDataLocation/krita/instruct_edit."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "krita" / PLUGIN_ID / "settings.json"


def point_managed_engine_at(python: str, settings_file: Path) -> bool:
    """Tell the plugin which Python runs `instruct-edit serve`, unless the user chose one already."""
    settings = {}
    if settings_file.exists():
        try:
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
        except ValueError:
            return False  # a file we cannot read is the user's; leave it alone
    if settings.get("python_path"):
        return False
    settings["python_path"] = python
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = settings_file.with_name(settings_file.name + ".tmp")
    temporary.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    temporary.replace(settings_file)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, help="plugin zip from scripts/build_plugin.py (default: plugin/)")
    parser.add_argument("--resources", type=Path, default=None, help="Krita resource folder")
    parser.add_argument("--kritarc", type=Path, default=None, help="kritarc file to enable the plugin in")
    parser.add_argument(
        "--python", default=sys.executable,
        help="Python with instruct-edit installed, for the plugin's managed engine (default: this one)",
    )
    parser.add_argument("--settings", type=Path, default=None, help="the plugin's settings.json")
    args = parser.parse_args(argv)
    source = args.zip or ROOT / "plugin"
    resources = args.resources or default_resources()
    kritarc = args.kritarc or default_kritarc()
    for path in install(source, resources):
        print(f"installed {path}")
    enable_in_kritarc(kritarc)
    settings_file = args.settings or default_settings_file()
    if point_managed_engine_at(args.python, settings_file):
        print(f"managed engine: {args.python} (in {settings_file})")
    print(f"enabled in {kritarc}; restart Krita and open Settings ▸ Dockers ▸ Instruct Edit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
