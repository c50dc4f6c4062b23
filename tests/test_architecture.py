"""The architecture: import-linter's contracts in pyproject.toml (layers kernels <- engine <- data <- eval | synth <-
bench <- cli, and no import cycle between the modules of any package) hold for embforge, imports inside functions
included. The contracts are also shown to break on a copy of the package with planted violations, so this test can
fail."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the embforge package found under `root`, with root's pyproject.toml (no cache written)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found: install import-linter (requirements/lock.txt)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_contracts_hold():
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def _plant(path: Path, code: str):
    path.write_text(path.read_text() + "\n\n" + code)


def test_contracts_break_on_a_wrong_way_import_and_a_cycle(tmp_path):
    shutil.copytree(REPO / "embforge", tmp_path / "embforge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    # A kernel reaching up into the trainer, inside a function (still an import to the architecture) ...
    _plant(tmp_path / "embforge" / "kernels" / "pooling.py", "def _planted():\n    from embforge.engine import train\n")
    # ... and the batch leaf importing the step that imports it: a cycle inside engine.
    _plant(tmp_path / "embforge" / "engine" / "batch.py",
           "def _planted():\n    from embforge.engine import gradcache\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "0 kept, 2 broken" in r.stdout, r.stdout[-4000:]
    assert "embforge.kernels is not allowed to import embforge.engine" in r.stdout
    assert "embforge.kernels.pooling -> embforge.engine.train" in r.stdout
    assert "No cycles are allowed in embforge.engine" in r.stdout
