"""Packaging facts that a fresh install depends on (read from the repository's files)."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def test_every_package_folder_is_listed_in_setup_cfg():
    listed = set(setup_cfg()["options"]["packages"].split())
    on_disk = {".".join(("sglang_dsde",) + p.parent.relative_to(ROOT / "sglang_dsde").parts)
               for p in (ROOT / "sglang_dsde").rglob("__init__.py")}
    on_disk |= {".".join(("sglang_dsde", "patches") + p.parent.relative_to(ROOT / "patches").parts)
                for p in (ROOT / "patches").rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)


def test_patches_install_inside_the_package_namespace():
    package_dir = setup_cfg()["options"]["package_dir"]
    assert "sglang_dsde.patches = patches" in package_dir
    import sglang_dsde.patches

    assert Path(sglang_dsde.patches.__file__).resolve().parent == ROOT / "patches"


def test_entry_point_and_pth_line():
    entry_points = setup_cfg()["options.entry_points"]["sglang.srt.plugins"]
    assert "dsde = sglang_dsde.plugin:register" in entry_points
    assert (ROOT / "sglang_dsde-early.pth").read_text().strip() == "import sglang_dsde.patches.early"
