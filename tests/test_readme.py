"""The README's "Your own model" example runs as written (a model the user defines)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under '## {title}'"
    return blocks[0]


def test_your_own_model_example_runs(capsys):
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(_section_code("Your own model"), str(README), "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "2 permutation groups (48 units), traced with fx" in out
    barrier = float(out.split("barrier ")[1])
    assert barrier < 1.0  # an aligned, fitted Bezier path between two digits networks
    result = namespace["aligned"]
    assert result.objective[-1] > result.objective[0]
