"""One real deployment for every deployment test: a coordinating centre (gateway + SuperLink,
TLS, registered nodes) and three hospitals (SuperNode + fedcare's site worker, their
secure-aggregation peers pinned), each a real process on this machine.

Starting and stopping a centre and three hospitals costs a minute of two cores; no deployment
test needs a fresh one, since each submits its own run (own run id, charges looked up by run
id) or adds a hospital of its own. A test that needs the centre and all three hospitals up
takes ``deployment``: whatever an earlier test crashed or stopped is started again first.

A session fixture runs once per pytest-xdist worker: the modules that take it carry
``pytest.mark.xdist_group(DEPLOYMENT_GROUP)`` (``_deployment.py``), which ``--dist loadgroup``
(the Makefile's) sends to one worker, and tests/conftest.py runs them one after the other.
Once the last of them is done, the deployment is stopped (:func:`pytest_runtest_teardown`)
rather than left idle to the session's end: its idle centre and hospitals poll each other
every few seconds (about 9 CPU seconds a minute, measured), CPU the rest of the suite
needs. A later test that asks for it gets it started again (``Deployment.ensure_running``:
the centre keeps its registered hospitals).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration._deployment import Deployment, processes_under

#: Far above what the runs the tests submit compose to (the dropped-site run and the secure
#: run, ε 8 each): one more test that charges the hospitals must not make whichever runs
#: last fail for lack of budget. Refusals for budget are tested elsewhere.
LIFETIME_EPSILON = 1000.0
#: The session fixture's name, and where it keeps the running deployment for the hook.
SHARED = "shared_deployment"
RUNNING = pytest.StashKey[Deployment]()


@pytest.fixture(scope="session")
def shared_deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    dep = Deployment.create(
        tmp_path_factory.mktemp("deployment"), patients=80, epsilon_budget=LIFETIME_EPSILON
    )
    dep.pin_peers()
    request.config.stash[RUNNING] = dep
    try:
        dep.start_server()
        for i in range(len(dep.sites)):
            dep.register(i)
        started = [dep.start_site(i) for i in range(len(dep.sites))]
        dep.wait_online(len(dep.sites), starting=started)
        yield dep
    finally:
        del request.config.stash[RUNNING]
        _stop(dep)


def _stop(dep: Deployment) -> None:
    """Stop the centre and every hospital, and check that nothing of theirs is left."""
    dep.stop_all()
    deadline = time.monotonic() + 15
    while processes_under(dep.root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_under(dep.root), "processes left behind"


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test in a row that takes the shared deployment, stop it. ``nextitem``
    is the test this process runs next (pytest-xdist holds a test back until it knows the
    next one)."""
    dep = item.config.stash.get(RUNNING, None)
    if dep is None or SHARED not in getattr(item, "fixturenames", ()):
        return
    if nextitem is not None and SHARED in getattr(nextitem, "fixturenames", ()):
        return
    _stop(dep)


@pytest.fixture()
def deployment(shared_deployment: Deployment) -> Deployment:
    """The shared deployment, its centre and all three hospitals running and online."""
    shared_deployment.ensure_running()
    return shared_deployment
