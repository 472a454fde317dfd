"""The README's usage example runs as written; its commands match .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang):
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs(capsys):
    blocks = _blocks("python")
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert "running_mean" in capsys.readouterr().out


def test_readme_test_command_is_what_ci_runs():
    commands = [b.strip() for b in _blocks("bash")]
    test_cmd = [c for c in commands if "pytest" in c and "venv" in c]
    assert len(test_cmd) == 1, commands
    pytest_part = test_cmd[0].split("&&")[-1].strip()        # .venv/bin/python -m pytest -q
    args = pytest_part.split("python", 1)[1].strip()          # -m pytest -q
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if not line.lstrip().startswith(("#", "echo"))]
    assert any(f'_PY" {args} ' in line for line in ci_lines), (args, "not run by .ci/run")
    assert any(c.endswith("-m gpubn") for c in commands), "README lacks the main-job command"
