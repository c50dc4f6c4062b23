"""The lock (requirements/lock.txt) covers every dependency pyproject names, and this environment is the lock.

A clean clone installs exactly the lock (scripts/setup.sh, --no-deps), so a dependency added to pyproject but not to
the lock would simply be missing there: this test says so by name instead of a confusing ImportError later."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("local", "eval", "dev")   # what scripts/setup.sh installs
GPU_EXTRAS = ("gpu", "quant")              # carried to the device as wheels: requirements/lock-gpu.txt


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"{path.name}:{n}: not an exact pin (name==version): {line!r}"
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def _pyproject_requirements(extras) -> list[tuple[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra in extras:
        reqs += [(f"extra '{extra}'", Requirement(r)) for r in project["optional-dependencies"][extra]]
    return reqs


def _check_covered(lock_name: str, extras, with_core: bool):
    pins = _read_lock(ROOT / "requirements" / lock_name)
    problems = []
    for where, req in _pyproject_requirements(extras):
        if not with_core and where == "dependencies":
            continue
        name = _norm(req.name)
        if name not in pins:
            problems.append(f"pyproject.toml names {req.name} ({where}) but requirements/{lock_name} lacks it")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"requirements/{lock_name} pins {req.name}=={pins[name]}, outside pyproject's "
                            f"'{req}' ({where})")
    assert not problems, "\n".join(problems) + "\nrun `bash scripts/lock.sh`, then the whole suite, and commit both"


def test_lock_covers_every_dependency_pyproject_names():
    _check_covered("lock.txt", LOCKED_EXTRAS, with_core=True)


def test_gpu_lock_covers_the_gpu_extras_at_the_cpu_locks_versions():
    _check_covered("lock-gpu.txt", GPU_EXTRAS, with_core=False)
    cpu, gpu = _read_lock(ROOT / "requirements" / "lock.txt"), _read_lock(ROOT / "requirements" / "lock-gpu.txt")
    both = sorted(set(cpu) & set(gpu))
    assert both, "lock-gpu.txt shares no package with lock.txt (bitsandbytes should be in both)"
    for name in both:
        assert cpu[name] == gpu[name], f"{name}: lock.txt pins {cpu[name]} but lock-gpu.txt pins {gpu[name]}"


def test_lock_check_names_a_missing_dependency(tmp_path, monkeypatch):
    """The coverage check itself can fail, and says which package is missing."""
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    broken = "\n".join(l for l in lock.splitlines() if not l.lower().startswith("pyyaml=="))
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "lock.txt").write_text(broken)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"names pyyaml.*lacks it"):
        _check_covered("lock.txt", LOCKED_EXTRAS, with_core=True)


def test_this_environment_is_the_lock():
    """What setup installed equals the lock: a drifted .venv (installed by hand) is caught here."""
    pins = _read_lock(ROOT / "requirements" / "lock.txt")
    drift = []
    for name, version in pins.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            drift.append(f"{name}=={version} is locked but not installed")
            continue
        if have != version:
            drift.append(f"{name}: locked {version}, installed {have}")
    assert not drift, "\n".join(drift) + "\nre-run `bash scripts/setup.sh` (it installs the lock)"
