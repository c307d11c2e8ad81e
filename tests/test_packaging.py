"""The installed package, not the repository: the wheel's console scripts work from any directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_wheel_installs_and_its_console_scripts_train_from_another_directory(tmp_path, tiny_flags):
    """Build the wheel (no editable install), install it alone into a folder, and from an unrelated
    directory run ``generalist-train --help``, train 2 steps with the packaged default tokenizer, and
    list the datasets with ``generalist-data``; the dependencies come from this interpreter."""
    dist, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = dist.glob("generalist-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def run(script: str, *args: str) -> str:
        done = subprocess.run([str(target / "bin" / script), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    code = "import generalist, train; print(generalist.__file__, train.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True).stdout
    assert where.count(str(target)) == 2  # the installed copies, not the repository's
    assert "--hidden_action_prob" in run("generalist-train", "--help")
    assert "control-core" in run("generalist-data", "--list")
    assert "--update_card" in run("generalist-eval", "control", "--help")
    run("generalist-train", *tiny_flags(tmp_path / "runs", run_name="wheel", total_steps=2, save_every=2, eval_every=2,
                                        run_eval=False))
    assert (tmp_path / "runs" / "wheel" / "model" / "tokenizer_config.json").is_file()
