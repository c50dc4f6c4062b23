"""`kill -9` of a real `embforge synth generate` process at several moments loses at most the requests in flight."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_synth_fakeserver import FakeLLM
from test_synth_generate import check_output, ledger

CONCURRENCY = 4


def _result_lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if b'"type":"result"' in line)
    except FileNotFoundError:
        return 0


def test_kill_minus_9_loses_only_in_flight_requests_and_resume_completes(tmp_path):
    out = tmp_path / "data.jsonl"
    raw = tmp_path / "data.raw.jsonl"
    with FakeLLM(delay=0.08) as fake:
        cmd = [sys.executable, "-m", "embforge", "synth", "generate", "--base-url", fake.base_url,
               "--model", "gpt-4o-mini", "--out", str(out), "--tasks-per-type", "3", "--examples-per-task", "3",
               "--concurrency", str(CONCURRENCY), "--no-progress", "--seed", "7"]
        env = dict(os.environ, OPENAI_API_KEY="sk-test", NO_PROXY="127.0.0.1,localhost")
        kills = 0
        for target in (3, 15, 40):  # during brainstorming, early examples, late examples
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while _result_lines(raw) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, f"run finished before the kill point: {proc.stderr.read().decode()[-2000:]}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            kills += 1
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        asked = len(fake.log)
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and len(fake.log) == asked, "a finished run asked the server again"

    recs = check_output(tmp_path)
    latest = {e["id"]: e for e in ledger(tmp_path)}
    planned = 4 + 4 * 3 * 3 + 2 * 3 * 3  # brainstorms + two-step examples + STS/bitext examples
    assert len(latest) == planned and all(e["status"] in ("accepted", "rejected") for e in latest.values())
    assert len(recs) == sum(e["status"] == "accepted" and e["kind"] == "example" for e in latest.values())
    # Everything the server answered beyond one request per planned id was in flight at a kill.
    assert planned <= asked <= planned + kills * CONCURRENCY
