"""What the Ray tests share: one local Ray for the whole session, and an executor that kills
one of its workers mid-run."""

from __future__ import annotations

import os
import signal

import pytest
from xai_ray import RayExecutor
from xai_ray.executor import import_ray

# The test Ray's object store: small, so that test_ray_files.py can stream a dataset whose
# decoded size exceeds it (Ray's minimum is 75 MiB).
OBJECT_STORE = 96 * 2**20


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray in this process, 2 CPUs and a 96 MiB object store, started the way the
    executor starts one, with an empty home directory meanwhile (nothing may be written there)."""
    ray = import_ray()
    if ray.is_initialized():  # another module's session: start ours with our settings
        ray.shutdown()
    home, before = tmp_path_factory.mktemp("home"), os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        context = RayExecutor(workers=2, object_store_memory=OBJECT_STORE).connect()
    finally:
        os.environ["HOME"] = before if before is not None else ""
    context.home = home
    yield context
    ray.shutdown()


class KillOneWorker(RayExecutor):
    """Kills the first actor's process (SIGKILL, from this process) once two parts are back."""

    def start_pool(self):
        actors = super().start_pool()
        self.pids = self._ray.get([a.pid.remote() for a in actors])
        return actors

    def map(self, step, batches):
        for index, part in enumerate(super().map(step, batches)):
            if index == 1:
                os.kill(self.pids[0], signal.SIGKILL)
                self.killed = self.pids[0]
            yield part


@pytest.fixture
def kill_one_worker() -> type[KillOneWorker]:
    return KillOneWorker
