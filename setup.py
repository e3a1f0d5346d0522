"""Minimal build hook beside setup.cfg (which holds all metadata).

Its one job: put ``sglang_dsde-early.pth`` at the root of the wheel (and of an editable
install), which setup.cfg cannot express. Python runs that one-line file at start-up in
every process of the environment, SGLang's spawned schedulers included, so the early
import hooks of ``sglang_dsde.patches.early`` are in place before SGLang's modules import
``sgl_kernel`` or ``torchvision``; see that module for why this cannot wait for the plugin.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = "sglang_dsde-early.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH_FILE, os.path.join(self.build_lib, PTH_FILE))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_FILE)]


setup(cmdclass={"build_py": BuildPyWithPth})
