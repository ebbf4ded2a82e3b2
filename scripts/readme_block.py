"""Rewrite one generated block of README.md: the lines between a pair of marker comments, where the table
scripts here (models_table.py, humanoid_table.py) put what they print."""

from __future__ import annotations

import re
from pathlib import Path

from trajformer.files import save_text

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(mark: str, text: str) -> None:
    """Put `text` between the two `mark` lines of README.md (temp file, then rename); nothing without the pair."""
    content = README.read_text()
    if content.count(mark) == 2:
        block = f"{mark}\n{text}\n{mark}"
        save_text(README, re.sub(f"{re.escape(mark)}.*?{re.escape(mark)}", lambda _: block, content, flags=re.S))
