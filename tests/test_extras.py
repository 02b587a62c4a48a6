"""The core install (issue 16): the codecs, the hooks and ``gradzip train`` on problems that
read no scikit-learn need neither matplotlib, scipy nor scikit-learn; a command that needs
them says which extra installs them, in one line, before it writes anything."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("matplotlib", "scipy", "sklearn")
#: run before the code under test: the experiments' packages cannot be imported
BLOCK = "import sys\nfor m in ('matplotlib', 'scipy', 'sklearn', 'tqdm'): sys.modules[m] = None\n"


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_core_dependencies_are_only_what_the_codecs_and_the_hook_need():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"]}
    assert core == {"torch", "numpy", "numba", "zlib-ng"}
    extras = project["optional-dependencies"]
    named = {e: {d.split(">")[0] for d in deps} for e, deps in extras.items()}
    assert {"matplotlib", "scipy", "scikit-learn", "tqdm"} <= named["experiments"]
    assert "tensorboard" in named["tensorboard"]
    assert named["experiments"] | named["tensorboard"] <= named["test"]


def test_importing_gradzip_and_its_hooks_imports_no_experiment_package(tmp_path):
    code = (
        "import sys\n"
        "import gradzip, gradzip.ddp, gradzip.fsdp, gradzip.stream, gradzip.optim, gradzip.cli\n"
        "import gradzip.experiments.runner\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXPERIMENTS!r}))\n"
    )
    r = python(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_core_commands_run_without_the_experiments_extra(tmp_path):
    code = BLOCK + (
        "from gradzip.cli import main\n"
        "assert main(['compressors', '--d', '1000']) == 0\n"
        "assert main(['methods']) == 0\n"
        f"assert main(['train', '--quiet', '--problem', 'lsq-synthetic', '--steps', '2', "
        f"'--method', 'fosgd', '--out', {str(tmp_path / 'run')!r}]) == 0\n"
    )
    r = python(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize(
    "argv, package",
    [
        (["compare", "--methods", "sgd", "--steps", "2"], "matplotlib"),
        (["demo"], "matplotlib"),
        (["reproduce", "dqgd", "--quick"], "matplotlib"),
        (["classes", "--quick"], "scikit-learn"),
        (["scales", "--quick"], "matplotlib"),
        (["train", "--problem", "mlp-digits", "--steps", "2"], "scikit-learn"),
        (["train", "--problem", "logreg", "--steps", "2"], "scikit-learn"),
    ],
)
def test_a_command_needing_the_extra_says_how_to_install_it(argv, package, tmp_path):
    out = tmp_path / "new" / "out"
    code = BLOCK + (
        f"from gradzip.cli import main\nsys.exit(main({[*argv, '--out', str(out)]!r}))\n"
    )
    r = python(code, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"this needs {package}, which is not installed" in lines[0]
    assert "pip install 'gradzip[experiments]'" in lines[0]
    assert not (tmp_path / "new").exists()
