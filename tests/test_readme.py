"""The README's first code block is exactly two commands, CI runs the second one verbatim, and the README's
other example commands do what they say when run in order after the quickstart."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_two_commands_and_ci_runs_the_test_command():
    block = re.search(r"```(?:bash)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2
    assert "sft-ray train jobs/configs/local-cpu.yaml" in commands[0]
    assert "pytest" in commands[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert commands[1].strip() in ci_lines


def _readme_command(prefix: str) -> list[str]:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith(prefix):
            return line.strip().split()
    raise AssertionError(f"no README line starts with {prefix!r}")


@pytest.mark.slow
def test_configuration_example_runs_after_the_quickstart(tmp_path, tiny_model_dir):
    """The README's override example, as written, in a checkout where the quickstart has run (its data exists);
    only the model (a tiny one) and the size of the evaluation are changed, to keep the test short."""
    import subprocess
    import sys

    from sft_ray.synthetic import write_task

    cmd = _readme_command(".venv/bin/sft-ray train jobs/configs/local-cpu.yaml train.name=")
    write_task(tmp_path / "runs" / "local-cpu" / "data", 320, 48, 42)  # what the quickstart leaves behind
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    args = [sys.executable, "-m", "sft_ray.cli"] + cmd[1:] + [
        f"model.name={tiny_model_dir}", "eval.max_examples=2", "eval.max_new_tokens=4", "eval.probe_max_new_tokens=4",
        "eval.loss=false"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    out = tmp_path / next(a.split("=", 1)[1] for a in cmd if a.startswith("output_dir="))
    assert (out / "model" / "model.safetensors").is_file() and (out / "eval" / "report.md").is_file()
    assert "holding out a seeded 10% of the train rows" in log  # its eval data is its own, not the built-in task's
    assert "plan: 5 optimizer steps" in log and "ZeRO 3" in log
