"""README.md opens with the two fresh-machine commands, and CI runs the same test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert "pip install -r requirements.txt" in main_job and "xai demo" in main_job
    assert "pip install -r requirements-dev.txt" in tests and tests.endswith("-m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-r requirements-dev.txt" in ci
    assert tests.split("&&")[-1].strip() in ci  # the same test command
    assert "ruff check ." in ci
