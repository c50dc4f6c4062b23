"""Versioned prompt templates in `templates/<name>.<version>.txt`.

Templates use `string.Template` ($name) rather than str.format so the JSON braces in them need no escaping.
Lines starting with '#' at the top are notes for maintainers and are not sent. A template's sha256 goes
into every request id, so editing a prompt can never be mistaken for a finished request of the old one.
"""
from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    text: str
    path: Path

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    @property
    def fields(self) -> set[str]:
        return {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(self.text)
                if m.group("named") or m.group("braced")}

    def render(self, **values) -> str:
        missing = self.fields - set(values)
        if missing:
            # An empty placeholder is the defect we exist to avoid: fail loudly instead of sending it.
            raise TemplateError(f"{self.path}: no value for placeholder(s) {sorted(missing)}")
        empty = [k for k in self.fields if str(values[k]).strip() == ""]
        if empty:
            raise TemplateError(f"{self.path}: empty value for placeholder(s) {sorted(empty)}")
        return string.Template(self.text).substitute(values)


@lru_cache(maxsize=None)
def load_template(name: str, version: str = "v1", directory: str | None = None) -> PromptTemplate:
    path = Path(directory or TEMPLATE_DIR) / f"{name}.{version}.txt"
    if not path.is_file():
        raise TemplateError(f"prompt template not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    text = "\n".join(lines).strip() + "\n"
    tmpl = PromptTemplate(name, version, text, path)
    try:
        string.Template(text).substitute({f: "x" for f in tmpl.fields})
    except ValueError as e:  # e.g. a stray '$' that should have been '$$'
        raise TemplateError(f"{path}: invalid template: {e}") from None
    return tmpl
