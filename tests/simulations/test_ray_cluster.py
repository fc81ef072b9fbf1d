"""The local Ray cluster a SuperLink's runs join: one clear error when it cannot start, and
a real one that listens on the loopback address it was given and leaves nothing behind.

That every run of a SuperLink joins it (one raylet, one GCS for two runs) is checked with
real runs in ``test_flower_driver``'s
``test_a_run_ended_at_its_output_frees_the_superlink_for_the_next``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedcare.common.processes import family_pids, flower_env, free_port, live_processes
from fedcare.simulations.ray_cluster import (
    HOLDER_PID_VAR,
    LOG_NAME,
    READY_FILE_VAR,
    READY_NAME,
    READY_TIMEOUT_VAR,
    RUNTIME_ENV_HOOK_VAR,
    RayCluster,
    RayClusterError,
    local_ray_cluster,
    wait_until_ready,
)


def _cluster(tmp_path: Path, code: str) -> tuple[RayCluster, subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", code])
    return RayCluster(proc, address="127.0.0.1:1", work_dir=tmp_path), proc


def test_a_holder_that_exits_is_one_error_naming_its_log(tmp_path: Path) -> None:
    cluster, proc = _cluster(tmp_path, "raise SystemExit(3)")
    proc.wait()
    with pytest.raises(RayClusterError, match="exited with code 3") as e:
        cluster.ready(timeout_s=60)
    assert str(tmp_path / LOG_NAME) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_cluster_that_is_not_up_in_time_is_one_error(tmp_path: Path) -> None:
    cluster, proc = _cluster(tmp_path, "import time; time.sleep(60)")
    try:
        with pytest.raises(RayClusterError, match=r"not up after 0\.2 s"):
            cluster.ready(timeout_s=0.2)
    finally:
        proc.kill()
        proc.wait()


def test_the_ready_mark_is_what_ready_waits_for(tmp_path: Path) -> None:
    cluster, proc = _cluster(tmp_path, "import time; time.sleep(60)")
    try:
        (tmp_path / READY_NAME).write_text("127.0.0.1:1", encoding="utf-8")
        cluster.ready(timeout_s=5)  # returns: the holder wrote its mark
        proc.kill()
        proc.wait()
        cluster.ready(timeout_s=0)  # once up, never asked again
    finally:
        proc.kill()
        proc.wait()


def test_a_driver_is_told_where_the_cluster_is_and_to_wait_for_it(tmp_path: Path) -> None:
    cluster, proc = _cluster(tmp_path, "import time; time.sleep(60)")
    try:
        env = cluster.driver_env(timeout_s=90)
    finally:
        proc.kill()
        proc.wait()
    assert env == {
        "RAY_ADDRESS": "127.0.0.1:1",
        RUNTIME_ENV_HOOK_VAR: "fedcare.simulations.ray_cluster.wait_until_ready",
        READY_FILE_VAR: str(tmp_path / READY_NAME),
        HOLDER_PID_VAR: str(proc.pid),
        READY_TIMEOUT_VAR: "90",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",  # else `uv run` would swap in Ray's uv hook
    }
    with pytest.raises(RayClusterError, match=r"exited with code -9"):
        cluster.ready(timeout_s=60)  # the holder died before its ready mark: at once


def _driver(monkeypatch: pytest.MonkeyPatch, cluster: RayCluster, timeout_s: float) -> None:
    """This process as a run's driver would be: with the cluster's ``driver_env``."""
    for name, value in cluster.driver_env(timeout_s=timeout_s).items():
        monkeypatch.setenv(name, value)


def test_a_drivers_ray_init_goes_on_once_the_cluster_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, proc = _cluster(tmp_path, "import time; time.sleep(60)")
    try:
        _driver(monkeypatch, cluster, timeout_s=60)
        (tmp_path / READY_NAME).write_text("127.0.0.1:1", encoding="utf-8")
        flower_runtime_env = {"env_vars": {"PYTHONPATH": "/x"}}  # what flwr-simulation passes
        assert wait_until_ready(flower_runtime_env) is flower_runtime_env
        assert wait_until_ready(None) is None
    finally:
        proc.kill()
        proc.wait()


def test_a_driver_waiting_for_a_cluster_that_died_or_is_late_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, proc = _cluster(tmp_path, "import time; time.sleep(60)")
    try:
        _driver(monkeypatch, cluster, timeout_s=0.2)
        with pytest.raises(RayClusterError, match=r"not up after 0\.2 s") as late:
            wait_until_ready({})
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(RayClusterError, match="exited before it took this run") as died:
        wait_until_ready({})
    for error in (late.value, died.value):
        assert str(tmp_path / LOG_NAME) in str(error)
        assert "\n" not in str(error)


@pytest.mark.slow
@pytest.mark.integration
def test_a_real_cluster_listens_on_its_loopback_address_and_stops_with_everything(
    tmp_path: Path,
) -> None:
    with local_ray_cluster(work_dir=tmp_path, env=flower_env()) as ray:
        host, port = ray.address.rsplit(":", 1)
        assert host == "127.0.0.1"
        ray.ready(timeout_s=240)
        assert (tmp_path / READY_NAME).read_text(encoding="utf-8") == ray.address
        with socket.create_connection((host, int(port)), timeout=5):
            pass  # the GCS answers on the port chosen before the cluster started
        family = family_pids(ray.pid)
        assert len(family) >= 3  # leash, holder, and Ray's own processes
    assert not (tmp_path / READY_NAME).exists()
    left = family & {p.pid for p in live_processes()}  # zombies left out
    assert not left, f"still running: {left}"


@pytest.mark.slow
@pytest.mark.integration
def test_a_cluster_that_ray_start_recorded_is_never_joined(tmp_path: Path) -> None:
    """Without an address, ``ray.init()`` joins the cluster that a ``ray start`` on the
    machine recorded in ``<ray temp dir>/ray_current_cluster``: anyone's. The shared cluster
    is always a new one, whatever that file says (here: a port nobody listens on)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        env = flower_env() | {"RAY_TMPDIR": str(ray_tmp)}
        with local_ray_cluster(work_dir=tmp_path, env=env) as ray:
            ray.ready(timeout_s=240)
            host, port = ray.address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5):
                pass
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
