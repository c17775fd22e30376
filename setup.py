"""Ship the top-level prompts/ folder inside the wheel, as erase/prompts/ (the concept files).

Everything else is declared in pyproject.toml. An editable install reads prompts/ from the
checkout instead (erase/concepts.py looks in both places)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithPrompts(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "erase" / "prompts"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(__file__).parent / "prompts", target)


setup(cmdclass={"build_py": BuildWithPrompts})
