"""The package a user installs: a wheel built from a clean clone, installed into a fresh
venv beside SGLang 0.5.23, registers DSDE through SGLang's own plugin loader.

The fresh venv sees this environment's third-party packages (SGLang, torch, ...) through a
folder of links that leaves out everything of sglang-dsde (its editable install and its
metadata), so the plugin found there can only come from the wheel: its entry point, its
package tree (``sglang_dsde.patches`` included) and its root ``.pth`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
import sglang_dsde, sglang_dsde.patches.early
algo = SpeculativeAlgorithm.from_string("DSDE")
print("resolved", algo.name, sglang_dsde.__file__)
"""


def _run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True,
                          timeout=600, **kw)


def _clean_clone(dest: Path) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no clean clone to build from")
    _run("git", "clone", "-q", "--no-hardlinks", ROOT, dest)
    return dest


def _third_party_view(dest: Path) -> Path:
    """Links to this environment's site-packages entries, minus sglang-dsde's own."""
    dest.mkdir()
    source = Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        name = entry.name.lower()
        if "sglang_dsde" in name or "sglang-dsde" in name or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def test_a_wheel_from_a_clean_clone_registers_dsde_in_a_fresh_venv(tmp_path):
    clone = _clean_clone(tmp_path / "clone")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         clone, "-w", tmp_path / "dist")
    wheels = list((tmp_path / "dist").glob("sglang_dsde-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; "
                                      "print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (purelib / "third_party.pth").write_text(str(_third_party_view(tmp_path / "beside")) + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0])
    assert (purelib / "sglang_dsde-early.pth").is_file()
    assert (purelib / "sglang_dsde" / "patches" / "early.py").is_file()
    assert not (purelib / "tools").exists()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SGLANG_PLUGINS")}
    out = _run(python, "-c", CHECK, env=env, cwd=tmp_path).stdout
    assert "resolved DSDE" in out, out
    assert str(purelib) in out, out  # the wheel's copy, not the checkout's
