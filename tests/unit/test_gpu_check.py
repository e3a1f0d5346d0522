"""The GPU check script (``tools/gpu_check.py``) runs end to end on the CPU (``--dry-run``,
small shapes, a fresh interpreter as an operator would start it): every check passes and
importing DSDE's pure parts imported no SGLang (the GPU machine has none)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_passes_without_sglang(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["dry_run"] and report["sglang_imported"] == []
    assert set(report["sync"]["policies"]) == {"dsde", "static", "sglang_adaptive",
                                               "adaedl", "goodput"}
    assert all(case["match"] for case in report["graphs"]["cases"])
    assert {(r["policy"], r["steps"]) for r in report["overhead"]} >= {("goodput", 4)}
    assert "# DSDE GPU check" in (tmp_path / "gpu_check.md").read_text()
    assert time.time() - t0 < 120
