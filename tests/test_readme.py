"""The README's claims stay true: its opening commands exist, and its runnable Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "./run/quickstart.sh" in first_block and "./run/test.sh" in first_block
    root = README.parent
    for script in ("run/quickstart.sh", "run/test.sh", "run/setup.sh", ".ci/run"):
        assert (root / script).is_file(), script


def test_readme_layer_example_runs_as_written():
    """The first complete example (the one that imports torch) must run unchanged."""
    example = next(block for block in _python_blocks() if block.startswith("import torch"))
    exec(compile(example, "README.md", "exec"), {})
