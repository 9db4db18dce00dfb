"""Shared fixtures: session-scoped local services for integration tests, started and stopped
by pid, and a one-thread setting for tests of tiny tensors; the per-test time budget and the
no-skip rule."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from service.devtools import stack

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default) and sees a finished training function only at a poll: a 1-worker run returned from
# fit() 5.0 s after its loop ended (two polls, then the shutdown), 1.0 s with 0.2 s polls
# (measured 2026-12-03). 0.5 s here, for every Ray the tests start: set in this process, it
# reaches the `dino` subprocesses, their local Rays and the `ray start` clusters. Production
# keeps Ray's default (a poll of every worker of a large group 4 times a second is not free).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# ---------------------------------------------------------------------------- time budget
# Every test must end within its budget: ``@pytest.mark.budget(seconds)`` beside the test,
# else DEFAULT_BUDGET_S. The budget covers setup, call and teardown, fixtures included (a
# shared fixture, e.g. a session's S3 or MLflow server or a module's trained run, is paid by
# the first test that uses it). Budgets are sized for CI's machine (2 cores, nothing else
# running) at about 1.5x a measured run; DINO_TEST_BUDGET_SCALE stretches all of them on a
# slower or busier machine.
DEFAULT_BUDGET_S = 10.0
_SPENT = pytest.StashKey[float]()


def budget_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("budget")
    seconds = float(marker.args[0]) if marker else DEFAULT_BUDGET_S
    return seconds * float(os.environ.get("DINO_TEST_BUDGET_SCALE") or 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        return
    if report.skipped:
        # Only a test that needs a GPU may skip; anything else missing is a failure.
        if item.get_closest_marker("gpu") is None and not hasattr(report, "wasxfail"):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} was skipped ({report.longrepr[-1]}): only tests "
                               "marked gpu may skip; install what it needs (pip install -e '.[dev]')")
        return
    spent = item.stash.get(_SPENT, 0.0) + report.duration
    item.stash[_SPENT] = spent
    limit = budget_of(item)
    if report.when != "setup" and spent > limit:
        item.stash[_SPENT] = float("-inf")  # said once
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {spent:.1f} s (setup to {report.when}), over "
                           f"its budget of {limit:.0f} s: make it faster, or raise its "
                           "@pytest.mark.budget with a measured reason")


# ---------------------------------------------------------------------------- two lanes
# The suite runs in two pytest-xdist workers (pyproject's addopts: ``-n 2 --dist loadgroup
# --no-loadscope-reorder``: xdist would otherwise order the modules by their number of tests),
# each module whole on one worker: its tests run one after another there, its module fixtures
# (a Ray cluster, a trained run) are made once. Integration modules wait on their services
# much of the time (measured: 41-63% of the machine's CPU idle during the sweep and
# storage-outage tests), so two modules share the two cores. ``-n 0`` runs one process.
# The modules go in collection order, so that integration and unit modules alternate (the
# integration modules first made both workers wait on services at once: two tests over
# their budgets on a loaded machine). The groups must be on the items before xdist's own
# hook reads them, hence ``tryfirst``: without it, the CI run of stop 32's commits spread
# one module's tests over both workers and built a module's cluster twice.


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # never imported by this check
    return bool(ray is not None and ray.is_initialized())


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test not marked integration that leaves a Ray running fails: Ray Data's readers and
    ``ray.remote`` calls start a local Ray in the test process, which then outlives the test
    beside every later cluster of the suite."""
    before = _ray_running()
    yield
    if not before and _ray_running() and request.node.get_closest_marker("integration") is None:
        import ray

        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started a Ray in the test process; mark it "
                    "integration (and say why it needs Ray) or keep Ray out of it")


@contextmanager
def private_ray_tmpdir() -> Iterator[Path]:
    """A short RAY_TMPDIR of a test's own (socket paths must stay under 108 characters);
    afterwards, any process still running from it is killed by pid."""
    path = Path(tempfile.mkdtemp(prefix="dino-rt-"))
    try:
        yield path
    finally:
        leftover = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(str(path) in arg for arg in p.info["cmdline"] or []):
                leftover.append(p)
        for p in leftover:
            p.kill()
        psutil.wait_procs(leftover, timeout=10)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short RAY_TMPDIR of this test's own; its leftover processes are killed after."""
    with private_ray_tmpdir() as path:
        yield path


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the session, then restore what was there before."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _running(service: stack.Service) -> Iterator[stack.Service]:
    """Yield ``service``; stop it by pid afterwards, even if the tests failed."""
    try:
        yield service
    finally:
        stack.stop(service)
        assert not stack.alive_pids(service), f"{service.name} left processes running"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a test of tiny tensors: on a busy 2-core machine the extra
    threads only add synchronisation (the 400-trial augmentation loops ran 20x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class S3Server:
    service: stack.Service

    @property
    def endpoint_url(self) -> str:
        return self.service.endpoint_url

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a fresh name and return the name."""
        return stack.create_bucket(self.service, prefix=prefix)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3 server; AWS_ENDPOINT_URL and test credentials are set for the session."""
    service = stack.start_s3(tmp_path_factory.mktemp("s3"))
    with _running(service), _environ(service.env):
        yield S3Server(service)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory) -> Iterator[stack.Service]:
    """``mlflow server`` on sqlite, artifacts proxied to a bucket; use ``.tracking_uri``."""
    root = tmp_path_factory.mktemp("mlflow")
    bucket = s3_server.new_bucket("mlflow")
    service = stack.start_mlflow(
        root, f"sqlite:///{root / 'mlflow.db'}", f"s3://{bucket}/", s3=s3_server.service
    )
    with _running(service):
        yield service


@contextmanager
def _ray_head(s3_server: S3Server, log_dir: Path, num_cpus: int) -> Iterator[stack.Service]:
    # Own short temp dir: Ray's socket paths must stay under 108 characters, and
    # /tmp/ray/ray_current_cluster is left alone.
    temp_dir = tempfile.mkdtemp(prefix="dino-ray-")
    try:
        service = stack.start_ray_head(log_dir, temp_dir=temp_dir, env=s3_server.service.env,
                                       num_cpus=num_cpus)
        auth = {k: v for k, v in service.env.items() if k.startswith("RAY_AUTH")}
        with _running(service), _environ(auth):
            yield service
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(s3_server, tmp_path_factory) -> Iterator[stack.Service]:
    """A ``ray start --head`` cluster with token auth; ``.address``, ``.dashboard_url``.

    Its workers inherit the S3 settings. RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH are set for
    the session (for subprocesses); RAY_ADDRESS is not, so a test's own ``ray.init()`` still
    starts its own cluster. In-process job clients use ``stack.auth_headers(ray_head)``.
    """
    with _ray_head(s3_server, tmp_path_factory.mktemp("ray"), num_cpus=2) as service:
        yield service


@pytest.fixture(scope="module")
def module_ray(s3_server, tmp_path_factory) -> Iterator[stack.Service]:
    """A cluster like ``ray_head`` that the ``dino train`` runs of one module share
    (``ray.address=``): each run then saves the start of a local Ray. Module-scoped: while
    two clusters run on one machine, Ray's State API in a worker cannot tell which is its own
    (a PlacementGroupCleaner traceback: "Found multiple active Ray instances"), so it must not
    outlive the module into tests that start their own Ray and read their output. 4 logical
    CPUs on 2 cores, so that small runs can share it."""
    with _ray_head(s3_server, tmp_path_factory.mktemp("module-ray"), num_cpus=4) as service:
        yield service


@pytest.fixture(scope="session")
def random_quickstart_checkpoint(tmp_path_factory) -> str:
    """A quickstart-shaped checkpoint with random weights (ViT-Tiny/8, 4 blocks, side 32)."""
    from dino_core import NetworkSpec, build_networks
    from service.config import backbone_meta, load_config, to_yaml
    from service.storage.checkpoints import write_checkpoint

    cfg = load_config("quickstart")
    m = cfg.model
    student, teacher = build_networks(NetworkSpec(
        arch=m.arch, patch_size=m.patch_size, img_size=cfg.aug.global_size, depth=m.depth,
        drop_path_rate=0.0, out_dim=m.out_dim, head_hidden_dim=m.head_hidden_dim,
        head_bottleneck_dim=m.head_bottleneck_dim))
    state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
             "config": cfg.model_dump(mode="json"), "backbone_meta": backbone_meta(cfg),
             "epoch": 1, "global_step": 32}
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint_000001"
    write_checkpoint(directory, state, to_yaml(cfg))
    return str(directory)
