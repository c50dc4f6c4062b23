"""Real offline training text for the CPU demo: Python standard-library documentation.

Each example pairs a natural question about a stdlib function ("What does json.dumps do in Python?") with the
first paragraph of its docstring; the hard negative is the docstring of another function of the same module.
Nothing is downloaded and nothing is invented: the text ships with every Python. (The chatterbot Q/A set is kept
for evaluation only.)
"""
from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

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


def build(path: str | Path, seed: int = 0) -> int:
    rng = random.Random(seed)
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
            records.append({"instruction": INSTRUCTION, "query": rng.choice(TEMPLATES).format(name=qual),
                            "positive": para, "negatives": [neg] if neg != para else [],
                            "task_type": "short-long", "language": "en", "meta": {"source": f"python:{qual}"}})
    rng.shuffle(records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return len(records)
