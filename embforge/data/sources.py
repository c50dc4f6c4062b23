"""Real offline training text for the CPU demo (sources and licences: docs/data.md).

Every record is real text that ships offline; nothing is invented. The E5 task shapes it covers:
- short-long: stdlib question -> docstring paragraph; FOLDOC / Jargon term -> definition; manual-page one-line
  summary -> its DESCRIPTION paragraph; Debian package one-line summary -> long description;
- short-short: stdlib question -> the docstring's first sentence;
- long-long (symmetric): FOLDOC's and the Jargon File's definitions of the same term.
Kept out, for evaluation only: chatterbot (Q/A), GCIDE (word -> definition, sense pairs), WordNet and gensim's
test corpora (reserved for independent evaluation, never read by embforge).
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import json
import random
import re
import sys
import warnings
from pathlib import Path

from embforge.common import open_atomic

MODULES = ["json", "os", "os.path", "re", "math", "random", "statistics", "string", "textwrap", "itertools",
           "functools", "collections", "datetime", "time", "shutil", "pathlib", "glob", "csv", "base64", "hashlib",
           "heapq", "bisect", "zlib", "gzip", "tarfile", "zipfile", "urllib.parse", "html", "difflib", "copy",
           "pprint", "operator", "calendar", "fractions", "decimal", "uuid", "secrets", "struct", "codecs",
           "unicodedata", "fnmatch", "tempfile", "subprocess", "socket", "threading", "queue", "logging"]
INSTRUCTION = "Given a question about a Python standard-library function, retrieve its documentation"
TEMPLATES = ["What does {name} do in Python?", "How do I use {name}?", "python {name} documentation",
             "Explain the function {name}"]


def _doc_paragraph(obj) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    para = doc.split("\n\n")[0].replace("\n", " ").strip()
    return para if len(para.split()) >= 6 else None


def _record(instruction, query, positive, task_type, source, negatives=()):
    return {"instruction": instruction, "query": query, "positive": positive, "negatives": list(negatives),
            "task_type": task_type, "language": "en", "meta": {"source": source}}


def stdlib_records(rng: random.Random) -> list[dict]:
    """Stdlib question -> docstring paragraph (short-long) and -> its first sentence (short-short); the given
    negative is another function of the same module."""
    by_module = {}
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        items = []
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj):
                continue
            if (getattr(obj, "__module__", None) or mod_name).split(".")[0] not in (mod_name.split(".")[0], "posixpath",
                                                                          "_json", "_collections", "_functools"):
                continue
            para = _doc_paragraph(obj)
            if para:
                items.append((f"{mod_name}.{name}", para))
        if len(items) >= 2:
            by_module[mod_name] = items
    seen, records = set(), []
    for mod_name, items in by_module.items():
        for qual, para in items:
            if para in seen:
                continue
            seen.add(para)
            neg = rng.choice([p for q, p in items if p != para] or [para])
            negs = [neg] if neg != para else []
            records.append(_record(INSTRUCTION, rng.choice(TEMPLATES).format(name=qual), para, "short-long",
                                   f"python:{qual}", negs))
            first = re.split(r"(?<=[.!?])\s", para)[0]
            if first != para and len(first.split()) >= 4:
                records.append(_record("Given a Python function name, retrieve a one-sentence summary of it",
                                       qual, first, "short-short", f"python:{qual}"))
    return records


def dictd_records(rng: random.Random) -> list[dict]:
    """FOLDOC and Jargon File term -> definition (short-long), and both definitions of a shared term (long-long,
    symmetric)."""
    from embforge.data.dictd import foldoc_or_jargon_definitions
    from embforge.data.mine import is_near_duplicate

    foldoc = foldoc_or_jargon_definitions("foldoc")
    jargon = foldoc_or_jargon_definitions("jargon")
    records = [_record("Given a computing term, retrieve its definition", t, d, "short-long", f"foldoc:{t}")
               for t, d in foldoc.items()]
    records += [_record("Given a hacker slang term, retrieve its definition", t, d, "short-long", f"jargon:{t}")
                for t, d in jargon.items()]
    for t in sorted(set(foldoc) & set(jargon)):
        a, b = (foldoc[t], jargon[t]) if rng.random() < 0.5 else (jargon[t], foldoc[t])
        if not is_near_duplicate(a, b, 0.8):   # FOLDOC often quotes the Jargon File: such pairs teach nothing
            records.append(_record("Retrieve a text that explains the same concept as the given definition", a, b,
                                   "long-long", f"foldoc+jargon:{t}"))
    return records


def _roff_text(lines: list[str]) -> str:
    """Plain text from roff source lines: font macros keep their words, other requests and escapes go."""
    out = []
    for ln in lines:
        if ln.startswith((".B ", ".I ", ".BR ", ".IR ", ".BI ", ".RB ", ".RI ", ".IB ")):
            out.append(ln.split(" ", 1)[1].replace('"', ""))
        elif ln.startswith((".", "'")):
            continue
        else:
            out.append(ln)
    text = " ".join(out)
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\\||\\\^|\\c", "", text)
    text = text.replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-").replace("\\e", "\\")
    text = re.sub(r"\\\(..|\\\*.|\\.", "", text)
    return " ".join(text.split())


def manpage_records(rng: random.Random, man_dir: str | Path = "/usr/share/man", limit: int = 3000) -> list[dict]:
    """Manual page one-line summary (NAME section) -> the first DESCRIPTION paragraph (short-long)."""
    files = sorted(Path(man_dir).glob("man1/*.gz")) + sorted(Path(man_dir).glob("man8/*.gz"))
    rng.shuffle(files)
    records, seen = [], set()
    for f in files[:limit]:
        try:
            src = gzip.open(f).read().decode("utf-8", errors="replace").splitlines()
        except (OSError, EOFError):
            continue
        sections, cur = {}, None
        for ln in src:
            m = re.match(r'\.SH\s+"?([A-Z ]+)"?', ln)
            if m:
                cur = m.group(1).strip()
                sections[cur] = []
            elif cur:
                sections[cur].append(ln)
        name = _roff_text(sections.get("NAME", []))
        if " - " not in name or "DESCRIPTION" not in sections:
            continue
        summary = name.split(" - ", 1)[1].strip()
        paras, buf = [], []
        for ln in sections["DESCRIPTION"]:
            if re.match(r"\.(PP|P|LP|TP|IP|HP|SS)\b", ln) or not ln.strip():
                if buf:
                    paras.append(buf)
                buf = []
            else:
                buf.append(ln)
        paras.append(buf)
        desc = next((t for t in (_roff_text(p) for p in paras) if len(t.split()) >= 12), None)
        if desc and len(summary.split()) >= 2 and summary not in seen:
            seen.add(summary)
            records.append(_record("Given what a user wants to do, retrieve the description of the command that "
                                   "does it", summary, desc[:1200], "short-long", f"man:{f.name}"))
    return records


def debian_records(status: str | Path = "/var/lib/dpkg/status") -> list[dict]:
    """Debian package one-line summary -> its long description (short-long), for the installed packages."""
    records, seen = [], set()
    text = Path(status).read_text(encoding="utf-8", errors="replace")
    for block in text.split("\n\n"):
        m = re.search(r"^Package: (\S+)$", block, flags=re.M)
        d = re.search(r"^Description: (.*)\n((?: .*\n?)*)", block, flags=re.M)
        if not m or not d:
            continue
        short = d.group(1).strip()
        long = " ".join(ln.strip() for ln in d.group(2).splitlines() if ln.strip() != ".")
        if len(long.split()) >= 12 and short not in seen:
            seen.add(short)
            records.append(_record("Given a one-line summary of a software package, retrieve its full description",
                                   short, long, "short-long", f"debian:{m.group(1)}"))
    return records


SOURCES = {"stdlib": lambda rng: stdlib_records(rng), "dictd": dictd_records, "man": manpage_records,
           "debian": lambda rng: debian_records()}


def collect(seed: int = 0, sources=tuple(SOURCES),
            cap_per_source: int | None = None) -> tuple[dict[str, list[dict]], random.Random]:
    """({source: its records, shuffled and capped}, the generator, for a later shuffle); prints one line per source to stderr. A source whose files are
    missing is skipped with a warning (scripts/setup.sh installs the dictd packages)."""
    rng = random.Random(seed)
    out = {}
    for name in sources:
        try:
            got = SOURCES[name](rng)
        except (FileNotFoundError, OSError) as e:
            warnings.warn(f"demo data: source {name!r} skipped ({e})", stacklevel=3)
            continue
        rng.shuffle(got)
        got = got[:cap_per_source] if cap_per_source else got
        shapes = {}
        for r in got:
            shapes[r["task_type"]] = shapes.get(r["task_type"], 0) + 1
        print(f"[demo data] {name}: {len(got)} records {shapes}", file=sys.stderr)
        out[name] = got
    return out, rng


def _write(path: Path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_atomic(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build(path: str | Path, seed: int = 0, sources=tuple(SOURCES), cap_per_source: int | None = None) -> int:
    """One training JSONL of every source, shuffled together (a single-file fixture for tests and benchmarks);
    returns the record count."""
    by_source, rng = collect(seed, sources, cap_per_source)
    records = [r for got in by_source.values() for r in got]
    rng.shuffle(records)
    _write(Path(path), records)
    return len(records)


def build_per_source(out_dir: str | Path, seed: int = 0, sources=tuple(SOURCES),
                     cap_per_source: int | None = None) -> dict[str, int]:
    """One JSONL per source, `<out_dir>/<source>.jsonl` (the datasets of a mixture: docs/train.md), the same records
    `build` writes for the same arguments; returns {source: record count}. A skipped source writes no file (and
    leaves any older file of that name alone)."""
    by_source, _ = collect(seed, sources, cap_per_source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in by_source.items():
        _write(out_dir / f"{name}.jsonl", records)
    return {name: len(records) for name, records in by_source.items()}
