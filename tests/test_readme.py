"""The README's Quick start is what CI runs: the two commands stay in sync with .ci/run."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def _quick_start_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_commands_that_install_torch_first() -> None:
    commands = _quick_start_commands()
    assert len(commands) == 2
    for command in commands:
        assert "\n" not in command.strip()
        assert command.index("pip install torch==2.13.0") < command.index("pip install -e")
    assert "text2sql run experiments/" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_readme_command_two_verbatim_then_the_slow_tier() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    fast = lines.index(_quick_start_commands()[1].strip())
    # The slow tier runs after the fast one, in the venv command 2 made (CI_SLOW=0 skips it).
    slow = lines.index("HF_HUB_OFFLINE=1 python -m pytest -m slow")
    assert fast < slow
    assert 'if [ "${CI_SLOW:-1}" = 1 ]; then' in lines[slow - 1]
    assert "export CI=true" in ci and "set -euo pipefail" in ci


def test_main_job_yaml_named_in_the_readme_exists() -> None:
    command = _quick_start_commands()[0]
    yaml_path = re.search(r"text2sql run (\S+\.yaml)", command)
    assert yaml_path and (REPO_ROOT / yaml_path.group(1)).is_file()
