"""End to end against the real llama.cpp server with SmolLM2-135M (CPU, offline): `synth generate --local`."""
from __future__ import annotations

import pytest

from embforge.cli import main as embforge_main
from embforge.synth.local import LocalServerError, llama_cpp_available, smollm2_gguf
from test_synth_generate import check_output, ledger


def _skip_without_assets():
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python[server] is not installed (pip install -c constraints.txt "
                    "'llama-cpp-python[server]')")
    try:
        smollm2_gguf()
    except LocalServerError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_generate_local_with_llama_cpp_and_smollm2(tmp_path, capsys):
    _skip_without_assets()
    out = tmp_path / "data.jsonl"
    args = ["synth", "generate", "--local", "--out", str(out), "--tasks-per-type", "1", "--examples-per-task", "2",
            "--task-types", "short-long,sts,bitext", "--no-progress", "--seed", "3",
            "--set", "languages={English: 1.0, French: 1.0}"]
    assert embforge_main(args) == 0, capsys.readouterr().err[-3000:]
    import json

    report = json.loads((tmp_path / "data.report.json").read_text())
    # llama.cpp answers json_schema with HTTP 500: the client must have stepped down to its grammar mode.
    assert report["structured_output"] == "json_object_schema"
    assert report["stop_reason"] == "complete" and report["pending_requests"] == 0
    recs = check_output(tmp_path)
    assert len(recs) >= 1, report
    assert report["cost"]["per_model"]["smollm2-135m-instruct"]["completion_tokens"] > 0
    # the rerun resumes: nothing is asked again, and the server is started and stopped again cleanly
    assert embforge_main(args) == 0
    assert len(check_output(tmp_path)) == len(recs)
    assert len({e["id"] for e in ledger(tmp_path)}) == len(ledger(tmp_path))
