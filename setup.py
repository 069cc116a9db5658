"""Ships the checkout's top-level data folders (conf/, search_spaces/, latency_tables/) inside the wheel as
fbnas/_data/<folder>; the repository keeps one copy, at the top level. fbnas.io.data_dir reads either."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_FOLDERS = ("conf", "search_spaces", "latency_tables")
# tables measured on the build machine (device=host_*) belong to it, not to the wheel
MACHINE_LOCAL = shutil.ignore_patterns("*__host_*.json", "__pycache__", "*.pyc")
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folders
            return
        for name in DATA_FOLDERS:
            shutil.copytree(os.path.join(HERE, name), os.path.join(self.build_lib, "fbnas", "_data", name),
                            ignore=MACHINE_LOCAL, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithData})
