"""A non-editable install (a wheel in a fresh venv) runs from any directory and finds the shipped files by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_shipped_model_is_in_the_wheel_data():
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    for model in (ROOT / "pretrained" / "models").iterdir():
        assert f"share/trajformer/pretrained/models/{model.name}" in data_files, f"add {model} to data-files"


def test_wheel_install_finds_shipped_models_configs_and_policies(tmp_path):
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # noqa: E731
    source = tmp_path / "source"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                               ".pytest_cache", ".ruff_cache", ".hypothesis"))
    built = run(sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                "-w", str(tmp_path / "wheel"))
    assert built.returncode == 0, built.stderr[-2000:]
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--system-site-packages", str(venv)).returncode == 0
    python = venv / "bin" / "python"
    (wheel,) = (tmp_path / "wheel").glob("trajformer-*.whl")
    installed = run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"}
    share = venv / "share" / "trajformer"
    check = run(str(python), "-c", "import trajformer, trajformer.quickstart as q, trajformer.behavior as b; "
                "print(trajformer.__file__); print(q.CONFIG); print(q.PRETRAINED); print(b.BEHAVIOR_DIR)",
                cwd=elsewhere, env=env)
    assert check.returncode == 0, check.stderr[-2000:]
    package, config, pretrained, behavior = check.stdout.split()
    assert package.startswith(str(venv)) and not package.startswith(str(ROOT))  # the wheel, not the checkout
    for path in (config, pretrained, behavior):
        assert path.startswith(str(share)) and Path(path).exists(), path
    info = run(str(venv / "bin" / "trajformer"), "info", "hopper-medium", cwd=elsewhere, env=env)
    assert info.returncode == 0 and f"run directory {share}/pretrained/models/hopper-medium" in info.stdout, info.stderr
    plan = run(str(venv / "bin" / "trajformer"), "plan", "hopper-medium", "--max-steps", "2", "--set",
               "plan.beam_width=2", "--set", "plan.horizon=2", cwd=elsewhere, env=env)
    assert plan.returncode == 0 and "mean return" in plan.stdout, plan.stderr[-2000:]
