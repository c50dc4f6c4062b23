"""`embforge data build-demo`: the demo's training JSONL as a command, records readable by the trainer's reader."""
import json

import pytest

from embforge.cli import main
from embforge.data.records import ExampleFile
from embforge.data.sources import build


def test_build_demo_writes_the_library_build(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert main(["data", "build-demo", "--out", str(out), "--sources", "stdlib", "--cap-per-source", "7"]) == 0
    assert capsys.readouterr().out.strip() == "7 examples"
    lines = out.read_text().splitlines()
    assert len(lines) == 7 and len(ExampleFile(out)) == 7
    assert all(json.loads(line)["meta"]["source"].startswith("python:") for line in lines)   # stdlib only
    ref = tmp_path / "ref.jsonl"
    build(ref, sources=("stdlib",), cap_per_source=7)
    assert out.read_bytes() == ref.read_bytes()
    # another seed: another sample
    assert main(["data", "build-demo", "--out", str(ref), "--sources", "stdlib", "--cap-per-source", "7",
                 "--seed", "1"]) == 0
    assert out.read_bytes() != ref.read_bytes()


def test_build_demo_refuses_an_unknown_source(tmp_path, capsys):
    assert main(["data", "build-demo", "--out", str(tmp_path / "x.jsonl"), "--sources", "wordnet"]) == 2
    assert "unknown source 'wordnet'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_build_demo_out_dir_writes_one_file_per_source(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "build-demo", "--out-dir", str(out), "--sources", "stdlib", "debian",
                 "--cap-per-source", "6"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["debian.jsonl", "stdlib.jsonl"]
    per_source = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in out.iterdir()}
    assert all(r["meta"]["source"].startswith(("python:" if name == "stdlib" else "debian:"))
               for name, recs in per_source.items() for r in recs)
    # the same records as the one-file build of the same arguments
    ref = tmp_path / "ref.jsonl"
    build(ref, sources=("stdlib", "debian"), cap_per_source=6)
    combined = sorted(ref.read_text().splitlines())
    assert sorted(line for p in out.iterdir() for line in p.read_text().splitlines()) == combined
    with pytest.raises(SystemExit):                 # --out or --out-dir: one of them is required
        main(["data", "build-demo", "--sources", "stdlib"])
