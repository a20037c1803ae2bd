"""The test process, the Makefile, CI and the README's commands never import the repository root as a package
root: its `kernels/` folder would shadow the PyPI package `kernels` that transformers imports (transformers 5.25
failed at collection that way under `python -m pytest`)."""

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_repository_root_is_not_on_sys_path():
    assert [p for p in sys.path if Path(p or ".").resolve() == ROOT] == []


def test_kernels_is_never_the_repository_folder():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # installed by transformers >= 5.x; absent with older ones
        folder = Path(spec.origin).resolve().parent if spec.origin else None
        assert folder not in (None, ROOT / "kernels"), f"`import kernels` finds {spec}"
    import specedit.kernels

    assert Path(specedit.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_transformers_imports_cleanly_beside_the_repository():
    import transformers
    from transformers import LlamaConfig

    if importlib.util.find_spec("transformers.integrations.hub_kernels"):  # the module that imports `kernels`
        importlib.import_module("transformers.integrations.hub_kernels")
    assert LlamaConfig(num_hidden_layers=1).num_hidden_layers == 1 and transformers.__version__


def commands() -> list[tuple[str, str]]:
    """(where, command line) of every command the project runs or tells a user to run from the root."""
    out = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t"):
            out.append(("Makefile", line.strip()))
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        if not line.lstrip().startswith("#"):
            out.append((".ci/run", line.strip()))
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL):
        out += [("README.md", line.strip()) for line in block.splitlines()]
    return out


def test_no_command_runs_python_with_the_root_on_sys_path():
    """`python -m X` and `python -c` put the current directory (the root) first on sys.path; a script's own
    folder (benchmarks/, examples/) or a console script (.venv/bin/pytest, specedit) does not."""
    bad = [(where, cmd) for where, cmd in commands() if re.search(r"python3?\s+-[mc]\s+(?!venv\b)", cmd)]
    assert bad == []
    assert any("/bin/pytest" in cmd for where, cmd in commands() if where == "Makefile")


def test_scripts_never_put_the_root_on_sys_path():
    for py in [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")]:
        assert "sys.path" not in py.read_text(), py
