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


def _two_commands():
    """The bash blocks of the README's "The two commands" section."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## The two commands.*?(?=^## )", text, flags=re.S | re.M)
    assert section, "README lacks its 'The two commands' section"
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section.group(0), flags=re.S)]


def test_readme_two_commands_set_up_from_scratch():
    fresh = [c for c in _two_commands() if c.startswith("python3 -m venv .venv && ")]
    main_job = [c for c in fresh if c.endswith("-m gpubn demo")]
    tests = [c for c in fresh if "-m pytest" in c]
    assert len(main_job) == 1 and len(tests) == 1, fresh


def test_readme_test_command_is_what_ci_runs():
    (test_cmd,) = [c for c in _two_commands() if "-m pytest" in c]
    pytest_part = test_cmd.split("&&")[-1].strip()           # .venv/bin/python -m pytest -q
    args = pytest_part.split("python", 1)[1].strip()          # -m pytest -q
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if not line.lstrip().startswith(("#", "echo"))]
    assert any(f'_PY" {args} ' in line for line in ci_lines), (args, "not run by .ci/run")
