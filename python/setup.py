"""Builds libhbmalloc.so with cargo and ships it inside the package (see pyproject.toml)."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BuildWithCargo(build_py):
    def run(self):
        subprocess.check_call(["cargo", "build", "--release", "--lib"], cwd=ROOT)
        lib = os.path.join(ROOT, "target", "release", "libhbmalloc.so")
        shutil.copy(lib, os.path.join(os.path.dirname(__file__), "hbmalloc", "libhbmalloc.so"))
        super().run()


class BinaryDistribution(Distribution):
    """A platform wheel: the package carries a native library."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithCargo}, distclass=BinaryDistribution)
