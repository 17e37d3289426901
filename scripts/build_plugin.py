"""Build the installable Krita plugin zip: dist/instruct_edit-<version>.zip.

The zip holds what Krita's "Import Python Plugin from File" expects at its top level:
instruct_edit.desktop, instruct_edit/ (the package), instruct_edit.action and manual.html.
The version comes from manifest.json.

    python scripts/build_plugin.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugin"
PLUGIN_ID = "instruct_edit"


def version() -> str:
    return json.loads((ROOT / "manifest.json").read_text(encoding="utf-8"))["version"]


def plugin_files() -> list[Path]:
    files = [PLUGIN / f"{PLUGIN_ID}.desktop", PLUGIN / f"{PLUGIN_ID}.action", PLUGIN / "manual.html"]
    for path in sorted((PLUGIN / PLUGIN_ID).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path)
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"plugin files missing: {', '.join(missing)}")
    return files


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PLUGIN_ID}-{version()}.zip"
    temporary = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in plugin_files():
            archive.write(path, path.relative_to(PLUGIN).as_posix())
        archive.writestr(f"{PLUGIN_ID}/VERSION", version() + "\n")
    temporary.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
