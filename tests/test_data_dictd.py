"""dictd reading (a tiny hand-made dictionary) and the GCIDE held-out sets (when dict-gcide is installed)."""
import gzip
from pathlib import Path

import pytest

from embforge.data.dictd import DICTD_DIR, foldoc_or_jargon_definitions, gcide_senses, read_dictd

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n):
    s = ""
    while True:
        s = B64[n % 64] + s
        n //= 64
        if not n:
            return s


def _write_dict(directory, name, entries):
    body, index, off = b"", [], 0
    for head, text in entries:
        raw = text.encode()
        index.append(f"{head}\t{_b64(off)}\t{_b64(len(raw))}")
        body += raw
        off += len(raw)
    (directory / f"{name}.index").write_text("\n".join(index) + "\n")
    with gzip.open(directory / f"{name}.dict.dz", "wb") as f:
        f.write(body)


def test_reader_and_parsers_on_a_hand_made_dictionary(tmp_path):
    _write_dict(tmp_path, "foldoc", [
        ("compiler", "compiler\n\n   <programming, tool> A program that converts another {program}\n"
                     "   to machine language.\n\n   See also {assembler}.\n\n   (1994-11-07)\n"),
        ("bug", "bug\n\n   short\n")])                           # too short: skipped
    _write_dict(tmp_path, "gcide", [
        ("Abandon", 'Abandon \\A*ban"don\\, v. t. [OF.]\n   1. To cast or drive out; to banish. "He abandoned it."'
                    " --Udall.\n      [1913 Webster]\n\n   2. (Law) To give up absolutely; to forsake.\n"
                    "      [1913 Webster]\n"),
        ("Wedging", "Wedge \\Wedge\\, v. t.\n   1. To cleave or separate with a wedge.\n")])  # not a main entry
    assert [h for h, _ in read_dictd("foldoc", tmp_path)] == ["compiler", "bug"]
    assert foldoc_or_jargon_definitions("foldoc", tmp_path) == {
        "compiler": "A program that converts another program to machine language."}
    assert gcide_senses(tmp_path) == {"abandon": ["To cast or drive out; to banish.",
                                                  "To give up absolutely; to forsake."]}


def test_wordnet_is_refused_and_missing_packages_are_named(tmp_path):
    with pytest.raises(ValueError, match="reserved for independent evaluation"):
        read_dictd("wn", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dict-jargon"):
        read_dictd("jargon", tmp_path)


@pytest.mark.skipif(not (Path(DICTD_DIR) / "gcide.index").exists(), reason="dict-gcide not installed")
def test_gcide_heldout_sets_are_disjoint_and_exclude_trained_terms():
    from embforge.eval.datasets import gcide_beir, gcide_sts

    ds = gcide_beir(n_queries=50, n_distractors=150)
    assert len(ds.queries) == 50 and len(ds.corpus) == 200
    assert all(len(ds.qrels[q]) == 1 and ds.instructions[q] for q in ds.queries)
    pairs = gcide_sts(n_pairs=40)
    assert len(pairs.scores) == 40 and sorted(set(pairs.scores)) == [0.0, 1.0]
    assert not set(pairs.sentence1) & set(ds.corpus.values())     # STS words are not retrieval words
    trained = set()
    for name in ("foldoc", "jargon"):
        if (Path(DICTD_DIR) / f"{name}.index").exists():
            trained |= set(foldoc_or_jargon_definitions(name))
    assert not trained & set(ds.queries.values())
    assert gcide_beir(n_queries=50, n_distractors=150).queries == ds.queries   # deterministic
