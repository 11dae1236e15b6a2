"""Installing and starting: the extras the README names, the editable install
against a same-named folder on sys.path, and the run header's preset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_extra_is_declared_and_named_next_to_the_command():
    # tensorboardX (a dependency) only writes the events; `tensorboard --logdir runs` needs the viewer.
    extras = _pyproject()["project"]["optional-dependencies"]
    assert any(re.match(r"tensorboard\b(?!X)", req) for req in extras.get("tensorboard", [])), extras
    assert not any(req.startswith("tensorboard") and not req.startswith("tensorboardX")
                   for req in extras["dev"]), "dev stays lean: the viewer is its own extra"
    readme = (REPO / "README.md").read_text()
    install = 'pip install -e ".[tensorboard]"'
    lines = [line for line in readme.splitlines() if "tensorboard --logdir" in line]
    assert lines and all(install in line for line in lines), lines


# ----------------------------------------------------------------------------- namespace-package trap


def _trap(tmp_path: Path) -> Path:
    """A directory holding a folder named `jaxatari` that is the repository root (no __init__.py):
    the layout after `git clone ... jaxatari`, seen from the clone's parent."""
    parent = tmp_path / "ns"
    parent.mkdir()
    (parent / "jaxatari").symlink_to(REPO, target_is_directory=True)
    return parent


FIND = "import importlib.util as u; s = u.find_spec('jaxatari'); print(s.origin)"


def test_editable_install_beats_a_folder_named_jaxatari(tmp_path):
    # The editable wheel pyproject.toml builds must put the repository on sys.path (a .pth path entry),
    # where the regular package wins over a namespace portion found earlier on sys.path; setuptools'
    # import-hook finder (its default for this flat layout) runs after the path finder and loses to it,
    # leaving `import jaxatari` an empty namespace package ("module 'jaxatari' has no attribute 'load_policy'").
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_editable(sys.argv[1]))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", build, str(wheels)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    site = tmp_path / "site"
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # No site-packages (-S), no PYTHONPATH (-E): only the trap's directory ('' for -c) and the wheel's .pth.
    code = f"import site, sys; site.addsitedir({str(site)!r}); {FIND}"
    proc = subprocess.run([sys.executable, "-S", "-E", "-s", "-c", code], cwd=_trap(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(REPO / "jaxatari" / "__init__.py"), proc.stdout


def test_installed_package_beats_a_folder_named_jaxatari(tmp_path):
    # The reproduction: `python -c "import jaxatari"` from the parent of a clone named jaxatari.
    site_dirs = [Path(p) for p in sys.path if p.endswith("site-packages")]
    if any(any(d.glob("__editable___jaxatari_*finder.py")) for d in site_dirs):
        pytest.skip("this environment's editable install predates pyproject's package-dir; "
                    "reinstall it (pip install -e .) to check")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FIND], cwd=_trap(tmp_path), env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin = proc.stdout.strip()
    assert origin != "None" and Path(origin).name == "__init__.py", origin  # a regular package, not a namespace


# ----------------------------------------------------------------------------- run header


def test_run_header_names_the_preset_and_only_the_options_that_differ():
    from jaxatari import driver
    from jaxatari.envs import ATARI_PRESETS

    nature = dict(ATARI_PRESETS["nature"])
    assert driver.describe_preset("nature", nature) == "preset nature"
    assert driver.describe_preset("nature", {**nature, "noop_max": 10}) == "preset nature, noop_max=10"
    assert driver.describe_preset("machado", dict(ATARI_PRESETS["machado"])) == "preset machado"
    assert (driver.describe_preset("nature", {**nature, "episodic_life": False, "repeat_action_probability": 0.25})
            == "preset nature, episodic_life=False, repeat_action_probability=0.25")
    assert driver.describe_preset("none", {}) == "preset none"
    assert driver.describe_preset("none", {"max_episode_steps": 200}) == "preset none, max_episode_steps=200"
    # The header line itself uses it (the full option set stays in config.json's env_spec).
    source = Path(driver.__file__).read_text()
    (header,) = [line for line in source.splitlines() if "on {c.env} (" in line]
    assert "{describe_preset(es.spec.preset, es.spec.options)}" in header and "es.spec.options}" not in header, header
