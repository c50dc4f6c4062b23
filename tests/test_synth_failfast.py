"""Synth fails fast and says so: no key for a remote endpoint, an endpoint that cannot be reached, and exit
codes that tell a complete run from an incomplete one (`generate` and `relabel`).

Nothing here leaves the machine: remote endpoints are `.invalid` names (RFC 2606: never resolve), proxies are
switched off, and everything else talks to the loopback fake server.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from embforge.cli import main as embforge_main
from embforge.cli.synth import EXIT_COMPLETE, EXIT_ERROR, EXIT_INCOMPLETE, EXIT_USAGE
from embforge.synth.client import LLMClient, RetryPolicy, is_loopback, redact_url
from embforge.synth.generate import run_generate
from test_synth_fakeserver import FakeLLM
from test_synth_generate import cfg_for, check_output
from test_synth_relabel import _write_records

NOWHERE = "http://nowhere.invalid/v1"
FAST_RETRIES = ["--set", "max_retries=1", "--set", "backoff_base=0.01", "--set", "backoff_max=0.02"]
EXAMPLE_PROMPT = "exactly these string fields"  # in every example template, in no brainstorm


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment would carry the request to a real machine (and answer for the unresolvable
    # host): these tests must see the local resolver's verdict and nothing else.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def generate(tmp_path: Path, base_url: str, *extra: str) -> int:
    return embforge_main(["synth", "generate", "--base-url", base_url, "--model", "gpt-4o-mini", "--out",
                          str(tmp_path / "data.jsonl"), "--tasks-per-type", "1", "--examples-per-task", "1",
                          "--task-types", "sts,short-long", "--no-progress", "--concurrency", "1", *extra])


def relabel(tmp_path: Path, base_url: str, *extra: str) -> int:
    if not (tmp_path / "in.jsonl").exists():
        _write_records(tmp_path / "in.jsonl")
    return embforge_main(["synth", "relabel", "--base-url", base_url, "--model", "gpt-4o-mini", "--input",
                          str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--embedder", "hashing",
                          "--top-k", "2", "--no-progress", "--set", "graders=[relevance]", *extra])


def report(tmp_path: Path, name: str = "data.report.json") -> dict:
    return json.loads((tmp_path / name).read_text())


def test_loopback_detection_and_redaction():
    for url in ("http://127.0.0.1:8080/v1", "http://127.8.9.10/v1", "http://localhost:1/v1", "http://LOCALHOST./v1",
                "http://[::1]:8000/v1", "http://vllm.localhost/v1"):
        assert is_loopback(url), url
    for url in ("https://api.openai.com/v1", "http://10.0.0.1/v1", "http://127.0.0.1.nip.io/v1", "http://0.0.0.0/v1",
                NOWHERE, "", "http://[::2]/v1"):
        assert not is_loopback(url), url
    assert redact_url("http://u:pw@[::1]:8000/v1?api-key=k") == "http://[::1]:8000/v1"
    assert redact_url("https://user:secret@host.invalid/v1?key=k#x") == "https://host.invalid/v1"


@pytest.mark.parametrize("command", [generate, relabel])
def test_remote_endpoint_without_a_key_fails_before_anything_starts(tmp_path, monkeypatch, capsys, command):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("EMBFORGE_TEST_KEY", raising=False)
    # No retries: if the check were missing, the run would fail fast (and differently) against the .invalid host.
    no_retry = ["--set", "max_retries=0"]
    assert command(tmp_path, NOWHERE, *no_retry) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY" in err and "--api-key-env" in err and "nowhere.invalid" in err
    assert command(tmp_path, NOWHERE, "--api-key-env", "EMBFORGE_TEST_KEY", *no_retry) == EXIT_USAGE
    assert "EMBFORGE_TEST_KEY" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in.jsonl"] if command is relabel else []), \
        "a run without a key opened its ledger/output (it got past the check)"


def test_loopback_server_needs_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLM() as fake:
        assert generate(tmp_path, fake.base_url) == EXIT_COMPLETE
        assert relabel(tmp_path, fake.base_url) == EXIT_COMPLETE
    assert len(check_output(tmp_path)) == 2 and report(tmp_path, "out.report.json")["records_written"] == 6


@pytest.mark.parametrize("command", [generate, relabel])
def test_unresolvable_host_stops_the_run_with_cannot_reach(tmp_path, monkeypatch, capsys, command):
    secret = "sk-embforge-test-SECRET-42"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    url = f"http://someone:pw-{secret}@nowhere.invalid/v1?api-key={secret}"
    assert command(tmp_path, url, *FAST_RETRIES, "--timeout", "10") == EXIT_ERROR
    err = capsys.readouterr().err
    assert "cannot reach http://nowhere.invalid/v1" in err and secret not in err and "pw-" not in err
    out = "data" if command is generate else "out"
    rep = report(tmp_path, f"{out}.report.json")  # written before exiting
    assert rep["stop_reason"] == "unreachable" and rep["fatal_error"].startswith("cannot reach")
    # It stopped instead of working through the plan: no request came back "failed", so the ledger holds none.
    results = [line for line in (tmp_path / f"{out}.raw.jsonl").read_text().splitlines() if '"result"' in line]
    assert results == []
    assert rep.get("pending_requests", rep.get("records_pending")) > 0
    for f in tmp_path.iterdir():
        assert secret not in f.read_text(errors="replace"), f.name


def test_connection_refused_spends_one_retry_budget_then_stops_and_a_rerun_completes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: every connect is refused
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        client = LLMClient(url, "gpt-4o-mini", None, retry=RetryPolicy(max_retries=2, backoff_base=0.01))
        sends = []
        create = client.sdk.chat.completions.create

        async def counting_create(**kw):
            sends.append(kw["messages"][-1]["content"])
            return await create(**kw)

        client.sdk.chat.completions.create = counting_create
        cfg = cfg_for(SimpleNamespace(base_url=url), tmp_path, concurrency=1)
        rep = run_generate(cfg, client=client)
    assert rep["stop_reason"] == "unreachable"
    assert rep["fatal_error"].startswith(f"cannot reach {url}") and "3 attempt(s)" in rep["fatal_error"]
    # One request, all of its attempts (1 + max_retries), then nothing more: not the 4 + 24 of the plan.
    assert len(sends) == 3 and len(set(sends)) == 1
    # Pending: the 4 brainstorms and the 2 x 2 x 2 STS/bitext examples (the other examples need tasks first).
    assert rep["pending_requests"] == 4 + 2 * 2 * 2
    with FakeLLM() as fake:
        cfg.base_url = fake.base_url
        again = run_generate(cfg)
    assert again["stop_reason"] == "complete" and len(check_output(tmp_path)) == 24


def test_generate_exit_codes_tell_complete_from_incomplete(tmp_path, capsys):
    # Transient faults that outlive the retries: requests stay pending.
    with FakeLLM(lambda n, p: "500" if EXAMPLE_PROMPT in p else None) as fake:
        assert generate(tmp_path / "a", fake.base_url, "--set", "max_retries=0") == EXIT_INCOMPLETE
    rep = report(tmp_path / "a")
    assert rep["stop_reason"] == "incomplete" and rep["pending_requests"] == 2
    assert "incomplete" in capsys.readouterr().err
    # Every request finished, but all were refused: nothing to train on.
    with FakeLLM(lambda n, p: "refusal" if EXAMPLE_PROMPT in p else None) as fake:
        assert generate(tmp_path / "b", fake.base_url) == EXIT_INCOMPLETE
    rep = report(tmp_path / "b")
    assert rep["stop_reason"] == "nothing_accepted" and rep["pending_requests"] == 0
    # The budget stops dispatch: incomplete too.
    with FakeLLM() as fake:
        assert generate(tmp_path / "c", fake.base_url, "--budget-usd", "2", "--set",
                        "prices={pricey: {input: 1000.0, output: 1000.0}}", "--model", "pricey") == EXIT_INCOMPLETE
    assert report(tmp_path / "c")["stop_reason"] == "budget"
    # The same command, once the server behaves, completes the first run's plan and exits 0.
    with FakeLLM() as fake:
        assert generate(tmp_path / "a", fake.base_url) == EXIT_COMPLETE
    assert report(tmp_path / "a")["stop_reason"] == "complete" and len(check_output(tmp_path / "a")) == 2


def test_relabel_exit_codes_tell_complete_from_incomplete(tmp_path):
    with FakeLLM(lambda n, p: "500" if n % 4 == 0 else None) as fake:
        assert relabel(tmp_path, fake.base_url, "--set", "max_retries=0") == EXIT_INCOMPLETE
        rep = report(tmp_path, "out.report.json")
        assert rep["stop_reason"] == "incomplete" and 0 < rep["records_pending"] < 6
        assert relabel(tmp_path, fake.base_url) == EXIT_COMPLETE
    rep = report(tmp_path, "out.report.json")
    assert rep["stop_reason"] == "complete" and rep["records_pending"] == 0


@pytest.mark.parametrize("sub", ["generate", "relabel"])
def test_exit_codes_are_documented_in_help_and_docs(sub, capsys):
    with pytest.raises(SystemExit) as e:
        embforge_main(["synth", sub, "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    docs = (Path(__file__).resolve().parents[1] / "docs" / "synth.md").read_text()
    for code, word in ((EXIT_COMPLETE, "complete"), (EXIT_ERROR, "stopped by an error"), (EXIT_USAGE, "bad usage"),
                       (EXIT_INCOMPLETE, "incomplete")):
        assert f"  {code}  {word}" in help_text, (code, word)
        assert f"| `{code}` | {word}" in docs, (code, word)
    assert "--api-key-env" in help_text
