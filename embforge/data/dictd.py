"""Read dictd dictionaries installed from Debian (`/usr/share/dictd/<name>.index` + `<name>.dict.dz`).

Used for real offline text (docs/data.md): FOLDOC and the Jargon File for training (embforge/data/sources.py),
GCIDE for held-out evaluation only (embforge/eval/datasets.py). WordNet (dict-wn) is never read here: it is
reserved for independent evaluation.

The index format: `headword \\t offset \\t length`, offsets in dictd's base64 alphabet, into the gunzipped .dict.
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path

DICTD_DIR = Path("/usr/share/dictd")
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
DEBIAN_PACKAGE = {"gcide": "dict-gcide", "foldoc": "dict-foldoc", "jargon": "dict-jargon"}
FORBIDDEN = ("wn", "wordnet")   # reserved for independent evaluation


def _b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def read_dictd(name: str, directory: str | Path = DICTD_DIR) -> list[tuple[str, str]]:
    """(headword, raw entry text) in index order; entries indexed under several headwords repeat."""
    if name.lower() in FORBIDDEN:
        raise ValueError(f"dictd {name!r} (WordNet) is reserved for independent evaluation; embforge never reads it")
    directory = Path(directory)
    index, data = directory / f"{name}.index", directory / f"{name}.dict.dz"
    if not index.is_file() or not data.is_file():
        pkg = DEBIAN_PACKAGE.get(name, f"dict-{name}")
        raise FileNotFoundError(f"{index} / {data} not found: install the Debian package {pkg} "
                                f"(apt-get install {pkg}; scripts/setup.sh does)")
    raw = gzip.open(data).read()
    out = []
    for line_no, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"{index}:{line_no}: expected 'headword<TAB>offset<TAB>length'")
        head, off, length = parts[0], _b64(parts[1]), _b64(parts[2])
        if head.startswith("00-database") or head.startswith(f"00-{name}"):
            continue
        out.append((head, raw[off:off + length].decode("utf-8", errors="replace")))
    return out


def clean(text: str) -> str:
    """Markup out, one line: {cross refs} to plain words, <category> tags and [source] notes dropped."""
    text = re.sub(r"^\s*\[[^\]]*\]\s*$", "", text, flags=re.M)   # [1913 Webster], [PJC] lines
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"^\s*<[^>]*>\s*", "", text)                    # FOLDOC's leading <category, ...>
    text = re.sub(r"\[(Obs|R|Archaic|Colloq|Poetic)\.?\]", "", text)
    return " ".join(text.split())


def _paragraphs(body: str) -> list[str]:
    return [p for p in (clean(b) for b in re.split(r"\n\s*\n", body)) if p]


def foldoc_or_jargon_definitions(name: str, directory: str | Path = DICTD_DIR) -> dict[str, str]:
    """term -> first definition paragraph (FOLDOC or Jargon layout: headword lines, blank line, body)."""
    defs: dict[str, str] = {}
    for head, entry in read_dictd(name, directory):
        lines = entry.split("\n")
        start = next((i for i, ln in enumerate(lines) if ln.startswith(" ")), None)  # body is indented
        if start is None:
            continue
        paras = [p for p in _paragraphs("\n".join(lines[start:])) if not re.fullmatch(r"[a-z]+\.|\(\d{4}-\d\d-\d\d\)",
                                                                                        p)]
        if not paras:
            continue
        first = re.sub(r"^(n|adj|v|vt|vi|adv|interj)\.\s+", "", paras[0])
        first = re.sub(r"^1\.\s+", "", first)
        first = re.sub(r"^(\[[^\]]*\]|<[^>]*>)\s*", "", first)   # Jargon's [usage] note, FOLDOC's <category>
        if len(first.split()) >= 5 and head.lower() not in defs:
            defs[head.lower()] = first
    return defs


def gcide_senses(directory: str | Path = DICTD_DIR) -> dict[str, list[str]]:
    """word -> numbered sense definitions of its main entry (quotations and citations cut).

    Only main entries (the entry's own headword equals the index key) of single alphabetic words with numbered
    senses, so each word maps to definitions of itself, not of a derived form."""
    senses: dict[str, list[str]] = {}
    for head, entry in read_dictd("gcide", directory):
        word = head.lower()
        if not re.fullmatch(r"[a-z]{3,}", word) or word in senses:
            continue
        if not entry.lower().startswith(word + " \\"):
            continue
        found = []
        for m in re.finditer(r"\n {3}\d+\. (.*?)(?=\n\s*\n|\n {3}\d+\. |\Z)", entry, flags=re.S):
            text = clean(m.group(1))
            text = re.split(r' "|--[A-Z]', text)[0].strip()                 # cut quotations and citations
            text = re.sub(r"^\([A-Z][\w.,& ]*\)\s*", "", text)                # (Zool.) field labels
            if len(text.split()) >= 4:
                found.append(text)
        if found:
            senses[word] = found
    return senses
