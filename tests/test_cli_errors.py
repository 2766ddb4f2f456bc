"""A bad row stops `sft-ray train` with the file, line and reason as the last line the user sees, on its own,
and exit code 1, whether the driver finds it before training (global order, or streamed data validated
first) or a worker's stream meets it while training (``data.validate_first=false``); the trace stays above."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("mode", [["data.shuffle=global"], ["data.shuffle=stream", "data.validate_first=false"]])
def test_bad_row_is_the_last_line(tmp_path, tiny_model_dir, mode):
    data = tmp_path / "chat.jsonl"
    rows = [json.dumps(GOOD)] * 6 + ['{"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", '
                                     '"tool_calls": [{"function": {"name": "f", "arguments": "{x: 1}"}}]}]}']
    data.write_text("\n".join(rows * 3) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sft_ray.cli", "train", "jobs/configs/local-cpu.yaml", f"model.name={tiny_model_dir}",
         f"output_dir={tmp_path / 'run'}", f"data.train={data}", "data.eval_fraction=0", "train.max_steps=2",
         "train.num_workers=1", "eval.enabled=false", *mode],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 1, proc.stderr[-3000:]
    # the last thing printed: "sft-ray: " and the bad rows (one, or a list when all were checked first)
    last = proc.stderr[proc.stderr.rindex("\nsft-ray: ") + 1:].rstrip()
    assert "chat.jsonl line 7: messages[1].tool_calls[0].function.arguments is not valid JSON" in last, last
    assert all(line.startswith(("sft-ray: ", "  /")) for line in last.splitlines()), proc.stderr[-3000:]
    if "data.validate_first=false" in mode:  # met on the worker: its trace is kept in the log
        assert "Traceback" in proc.stderr
