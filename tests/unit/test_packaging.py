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
    assert on_disk <= listed, sorted(on_disk - listed)


def test_patches_import_path_is_their_folder():
    assert "package_dir" not in setup_cfg()["options"]
    import sglang_dsde.patches

    assert Path(sglang_dsde.patches.__file__).resolve().parent == ROOT / "sglang_dsde" / "patches"


def test_tools_do_not_install_with_the_plugin():
    listed = set(setup_cfg()["options"]["packages"].split())
    assert all(name.startswith("sglang_dsde") for name in listed), listed


def test_entry_point_and_pth_line():
    entry_points = setup_cfg()["options.entry_points"]["sglang.srt.plugins"]
    assert "dsde = sglang_dsde.plugin:register" in entry_points
    assert (ROOT / "sglang_dsde-early.pth").read_text().strip() == "import sglang_dsde.patches.early"
