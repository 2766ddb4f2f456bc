"""The README's first code block is exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_commands_and_ci_runs_the_test_command():
    block = re.search(r"```(?:bash)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert "sft-ray train jobs/configs/local-cpu.yaml" in commands[0]
    assert "pytest" in commands[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert commands[1].strip() in ci_lines
