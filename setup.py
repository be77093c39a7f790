"""Build hook (the project's metadata is in pyproject.toml): the wheel carries the notebooks and the params
(profiles, accelerate configs, the paper's numbers) as package data under kvlib/_resources/, copied at build time
from the repository's notebooks/ and params/, which stay their one source (kvlib.engine.resources reads them from
the checkout when there is one). `kvlib init DIR` writes them out of an installed wheel."""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
RESOURCES = {"notebooks": "*.ipynb", "params": "**/*"}  # folder of the repository -> the files the wheel carries


class BuildPyWithResources(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "kvlib" / "_resources"
        shutil.rmtree(target, ignore_errors=True)
        for folder, pattern in RESOURCES.items():
            for path in sorted((ROOT / folder).glob(pattern)):
                if path.is_file() and "__pycache__" not in path.parts and ".ipynb_checkpoints" not in path.parts:
                    dest = target / path.relative_to(ROOT)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, dest)


setup(cmdclass={"build_py": BuildPyWithResources})
