"""Every Python code block of the README and the documentation runs (quick tier), so that no example rots.

A block tagged `python` is executed, the blocks of one page in order and sharing their names (as a reader pastes
them one after another). A block that cannot run here (it needs a trained checkpoint, a GPU, several processes or
data a user brings) is tagged `py` instead and starts with a `# Illustrative:` comment that says why.
"""

import re
from pathlib import Path

import pytest
from mktestdocs import grab_code_blocks

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(page: Path, lang: str) -> list[str]:
    return grab_code_blocks(page.read_text(encoding="utf-8"), lang=lang)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save write here, never into the repository
    namespace: dict = {"__name__": "__docs__"}
    for index, block in enumerate(blocks(page, "python")):
        try:
            exec(compile(block, f"{page.name}[block {index}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name}, Python block {index} fails:\n{block}") from error


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_illustrative_blocks_say_why(page):
    for block in blocks(page, "py"):
        assert re.match(r"\s*# Illustrative: \S", block), f"{page.name}: a `py` block without its reason:\n{block}"
