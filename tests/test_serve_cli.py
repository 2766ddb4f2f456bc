"""`sft-ray serve` as a user runs it: a subprocess, key from an env var, 127.0.0.1, Ctrl-C stops it."""

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow
PORT = 8125


def _ctrl_c_to_another_thread(pid: int) -> None:
    """SIGINT as the kernel may deliver Ctrl-C: to one of the process's other threads (Ray's, gRPC's) that does
    not block it, not to the main thread. The command must still stop (with its main thread asleep for an hour,
    it did not: the suite saw `sft-ray serve` ignore Ctrl-C for 60 s, now and then)."""
    import ctypes

    def unblocked(tid: str) -> bool:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(next(x for x in status.splitlines() if x.startswith("SigBlk:")).split()[1], 16)
        return not blocked & (1 << (signal.SIGINT - 1))

    others = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid) and unblocked(t)]
    tgkill = {"x86_64": 234, "aarch64": 131}.get(platform.machine())  # the syscall's number differs by architecture
    if not others or tgkill is None:  # nothing but the main thread takes it, or no known tgkill: the plain signal
        os.kill(pid, signal.SIGINT)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(tgkill, pid, int(others[0]), signal.SIGINT) == 0, ctypes.get_errno()


def test_sft_ray_serve_command(tiny_model_dir, tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "stop", "--force"], capture_output=True)
    key = "sk-cli-test-secret-value"
    env = {**os.environ, "MY_KEY": key, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "sft-ray"), "serve", str(tiny_model_dir),
                             "--port", str(PORT), "--api-key-env", "MY_KEY", "serve.model_name=tiny"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and "Ctrl-C stops" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=5).status_code == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="nope").models.list()
    finally:
        _ctrl_c_to_another_thread(proc.pid)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run([ray, "stop", "--force"], capture_output=True)
    text = (tmp_path / "serve.log").read_text()
    assert f"at http://127.0.0.1:{PORT}/v1" in text and "API key required" in text
    assert key not in text  # the secret never reaches the logs
    assert proc.returncode == 0, text[-2000:]
