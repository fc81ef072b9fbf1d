"""A Flower process fedcare starts never joins a Ray cluster someone else started.

Without an address, ``ray.init()`` joins the cluster a ``ray start`` on the machine recorded
in ``/tmp/ray/ray_current_cluster`` (or the one ``RAY_ADDRESS`` names): its owner would then
run the hospitals' ClientApps, patient data in hand. ``flower_env`` sets ``RAY_ADDRESS`` to
``local`` (Ray: start a new cluster) whatever was inherited; the simulation's SuperLink then
points it at fedcare's own shared cluster (``tests/simulations/test_ray_cluster.py`` checks
a recorded cluster is never joined there).
"""

from __future__ import annotations

import pytest

from fedcare.common.processes import flower_env


@pytest.mark.parametrize("inherited", [None, "10.0.0.5:6379", "auto", ""])
def test_a_flower_process_starts_its_own_ray_cluster(inherited: str | None) -> None:
    base = {"PATH": "/usr/bin"} | ({} if inherited is None else {"RAY_ADDRESS": inherited})
    assert flower_env(base=base)["RAY_ADDRESS"] == "local"
