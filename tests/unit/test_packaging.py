"""`pip install .` (the README's way) gives a tpenv whose every part is in the wheel:
both packages, the console scripts, and the manager templates from the top-level templates/."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_both_packages_scripts_and_templates(tmp_path):
    # -- stage 1: build the wheel exactly as pip install . would ----------------------------
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    (wheel,) = tmp_path.glob("tpenv-*.whl")

    # -- stage 2: what it holds -------------------------------------------------------------
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted(n for n in names if n.startswith("tpenv/templates/manager/"))
    on_disk = sorted(f"tpenv/templates/manager/{p.name}" for p in (ROOT / "templates" / "manager").glob("*.j2"))
    assert templates == on_disk and on_disk
    assert "tpenv_agent/inject.py" in names and "tpenv/cli/main.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "tpenv = tpenv.cli.main:main" in text and "tpenv-agent = tpenv_agent.main:main" in text
    assert "kubectl-tpenv = tpenv.cli.main:main" in text  # the kubectl plugin
