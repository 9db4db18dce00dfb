"""Faults injected into the services around a training run: the object store goes away (and
comes back, or not), the MLflow server is killed (and restarted), two first runs create one
sqlite tracking store at once. Real processes throughout: ``dino train`` with its own local
Ray, moto's S3 server, ``mlflow server``.

The S3 outage is a TCP proxy process between the run and moto, killed and restarted on the
same port: for the client that is a server that refuses connections, and moto (which keeps its
buckets in memory only) keeps the data written before the outage.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_service_train import TINY

from service.devtools import stack
from service.storage import checkpoints as ckpt

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers


def _proxy_main(listen: int, target: int) -> None:
    """Forwards 127.0.0.1:listen to 127.0.0.1:target until killed."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


class Proxy:
    """The TCP proxy as a process of its own: ``kill`` is a SIGKILL, ``start`` binds the same
    port again."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, stack.free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, __file__, "proxy", str(self.port), str(self.target_port)]
        for _ in range(50):  # the port can stay busy for a moment after the kill
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)
            assert self.proc.stdout is not None
            if self.proc.stdout.readline().strip() == "ready":
                return
            self.proc.wait()
            time.sleep(0.2)
        raise RuntimeError(f"the proxy could not bind port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class S3Outage:
    moto: stack.Service
    proxy: Proxy
    bucket: str
    env: dict[str, str]  # what the run gets: the proxy as AWS_ENDPOINT_URL

    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing",
                                 endpoint_url=self.moto.endpoint_url, skip_instance_cache=True,
                                 use_listings_cache=False)


@pytest.fixture
def s3_outage(tmp_path) -> Iterator[S3Outage]:
    """moto of this test's own behind a proxy (the session's S3 server is left alone)."""
    moto = stack.start_s3(tmp_path / "moto")
    proxy = Proxy(int(moto.endpoint_url.rsplit(":", 1)[1]))
    try:
        proxy.start()
        bucket = stack.create_bucket(moto, prefix="outage")
        env = {**moto.env, "AWS_ENDPOINT_URL": proxy.url,
               "DINO_STORAGE_SPOOL_DIR": str(tmp_path / "spool")}
        yield S3Outage(moto, proxy, bucket, env)
    finally:
        proxy.kill()
        stack.stop(moto)


@dataclass
class Run:
    """A ``dino train`` process whose output lines are read (and timed) by a thread."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, overrides: list[str], env: dict[str, str]) -> Run:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "train", *TINY, *overrides], cwd=REPO,
            env={**os.environ, "RAY_ADDRESS": "", **env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        run = cls(proc)
        run.reader = threading.Thread(target=run._read, daemon=True)
        run.reader.start()
        return run

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, re.Match]:
        deadline, seen = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            for t, line in self.lines[seen:]:
                seen += 1
                if m := re.search(pattern, line):
                    return t, m
            if self.proc.poll() is not None and self.reader and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text[-4000:]}")

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        assert self.reader is not None
        self.reader.join(timeout=10)
        return self.proc.returncode

    def after(self, t0: float) -> list[str]:
        return [line for t, line in self.lines if t >= t0]


QUIET = ["tracking.enabled=false", "ray.max_failures=0", "ray.num_workers=1"]
MLFLOW_EPOCHS = 6  # 48 steps, in process


def _steps_in_bucket(out: S3Outage, run_name: str, tmp_path: Path) -> dict[int, str]:
    """global step -> checkpoint name, for every checkpoint in the bucket (each downloaded
    straight from moto and verified against its manifest)."""
    fs, found = out.s3fs(), {}
    for entry in fs.ls(f"{out.bucket}/runs/{run_name}", detail=True):
        name = entry["name"].rsplit("/", 1)[-1]
        if entry["type"] == "directory" and name.startswith("checkpoint_"):
            local = tmp_path / "verify" / name
            fs.get(entry["name"] + "/", str(local) + "/", recursive=True)
            found[ckpt.verify(local)["global_step"]] = name
    return found


# ---------------------------------------------------------------------------- S3 outage


@pytest.mark.budget(240)
def test_s3_outage_during_training_is_waited_out(s3_outage, tmp_path, ray_tmp):
    """The proxy to S3 is killed at step ~3 of 24 and restarted 20 s later (longer than
    s3fs's and botocore's own retries bridge: a refused connection raised after 10.3 s,
    measured 2026-12-03): the checkpoint upload that meets the outage is retried in the
    background until storage is back while training goes on, and all 3 epoch checkpoints
    and the backbone are in the bucket, complete."""
    outage_s = 20.0
    run = Run.start([*QUIET, f"storage.root=s3://{s3_outage.bucket}/runs", "run_name=outage",
                     "train.epochs=3", "train.keep_last=10"],
                    {**s3_outage.env, "RAY_TMPDIR": str(ray_tmp),
                     "DINO_STORAGE_RETRY_SECONDS": "300"})  # fmt: skip
    try:
        run.wait_for(r"step 3/24 ", 240)
        s3_outage.proxy.kill()
        down_at = time.monotonic()
        time.sleep(outage_s)
        s3_outage.proxy.start()
        back_at = time.monotonic()
        rc = run.finish(timeout=300)
    finally:
        run.finish(timeout=1)
    text = run.text
    assert rc == 0, text[-5000:]
    assert "step 24/24" in text
    after = run.after(back_at)
    retries = re.findall(r"failed \(.*\); retry \d+ in", "".join(run.after(down_at)))
    during = [line for t, line in run.lines if down_at <= t < back_at]
    steps_during = re.findall(r"step (\d+)/24 ", "".join(during))
    assert retries, text[-5000:]
    assert steps_during, text[-5000:]  # the upload waits in the background, not the step
    assert "reachable again" in text
    assert after, text[-5000:]
    steps = _steps_in_bucket(s3_outage, "outage", tmp_path)
    assert sorted(steps) == [8, 16, 24], steps
    assert s3_outage.s3fs().exists(f"{s3_outage.bucket}/runs/outage/teacher_backbone.safetensors")
    kept = tmp_path / "spool" / "kept"
    assert not kept.exists() or not any(p.is_file() for p in kept.rglob("*"))
    assert not any((tmp_path / "spool" / "inflight").glob("*"))
    before = "".join(line for t, line in run.lines if t <= down_at)
    killed_at_step = re.findall(r"step (\d+)/24 ", before)
    print(f"\nS3 outage {outage_s:.0f} s (proxy killed after step {killed_at_step[-1]} was "
          f"printed): {len(retries)} retries logged, {len(set(steps_during))} steps trained "
          f"during the outage; checkpoints in the bucket at steps {sorted(steps)}, all verified")



@pytest.mark.budget(180)
def test_s3_that_never_comes_back_fails_the_run_and_keeps_the_checkpoint(
    s3_outage, tmp_path, ray_tmp
):
    """The proxy is killed at step ~3 and stays down, DINO_STORAGE_RETRY_SECONDS=8, uploads
    synchronous: the run fails at the checkpoint with an error naming the storage URL and the
    checkpoint that could not be uploaded, which is on local disk, complete."""
    root = f"s3://{s3_outage.bucket}/runs"
    run = Run.start([*QUIET, f"storage.root={root}", "run_name=gone", "train.epochs=3",
                     "train.checkpoint_upload=sync"],
                    {**s3_outage.env, "RAY_TMPDIR": str(ray_tmp),
                     "DINO_STORAGE_RETRY_SECONDS": "8"})  # fmt: skip
    try:
        run.wait_for(r"step 3/24 ", 240)
        s3_outage.proxy.kill()
        down_at = time.monotonic()
        rc = run.finish(timeout=300)
        failed_s = time.monotonic() - down_at
    finally:
        run.finish(timeout=1)
    text = run.text
    assert rc != 0, text[-5000:]
    final = text[text.rindex("StorageError: storage "):]
    assert final.startswith(f"StorageError: storage {root} stayed unreachable"), final[:2000]
    m = re.search(r"not uploaded, kept on local disk: (\S+) \((.*)\)", final)
    assert m, final[:2000]
    kept = Path(m.group(1))
    assert kept.is_relative_to(tmp_path / "spool" / "kept" / s3_outage.bucket / "runs" / "gone")
    manifest = ckpt.verify(kept)
    assert m.group(2) == f"epoch {manifest['epoch']} step {manifest['global_step']}, complete"
    assert manifest["global_step"] % 8 == 0 and "step 24/24" not in text
    first = final.splitlines()[0]
    print(f"\nS3 gone for good: the run failed {failed_s:.1f} s after the outage began "
          f"(DINO_STORAGE_RETRY_SECONDS=8): {first!r}; local copy {kept} verified "
          f"(step {manifest['global_step']})")


@pytest.mark.budget(60)
def test_upload_file_waits_out_an_outage_or_keeps_the_file(s3_outage, tmp_path, monkeypatch):
    """``storage.upload_file`` (no Ray): through a 5 s outage the upload arrives; through one
    longer than ``storage.retry_seconds`` it fails naming the URL and keeps the file."""
    from service import storage

    for key, value in s3_outage.env.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "teacher_backbone.safetensors"
    local.write_bytes(os.urandom(1 << 16))
    url = f"s3://{s3_outage.bucket}/runs/up/teacher_backbone.safetensors"

    s3_outage.proxy.kill()
    threading.Timer(5.0, s3_outage.proxy.start).start()
    storage.configure(retry_seconds=60, spool_dir=tmp_path / "spool")
    t0 = time.monotonic()
    storage.upload_file(local, url)
    waited = time.monotonic() - t0
    assert s3_outage.s3fs().cat_file(url.removeprefix("s3://")) == local.read_bytes()

    s3_outage.proxy.kill()
    storage.configure(retry_seconds=3, spool_dir=tmp_path / "spool")
    t0 = time.monotonic()
    try:
        with pytest.raises(storage.StorageError, match=rf"storage {re.escape(url)}\.2: .*kept at "):
            storage.upload_file(local, url + ".2")
    finally:
        storage.configure()  # this process's defaults again
    failed = time.monotonic() - t0
    kept = tmp_path / "spool" / "kept" / s3_outage.bucket / "runs" / "up" / (local.name + ".2")
    assert kept.read_bytes() == local.read_bytes()
    print(f"\nupload_file: 5 s outage waited out in {waited:.1f} s; permanent outage failed "
          f"after {failed:.1f} s (limit 3 s + one attempt), file kept at {kept}")


# ---------------------------------------------------------------------------- MLflow down


def _loss_steps(tracking_uri: str, run_name: str) -> tuple[list[int], str]:
    """The steps of the run's ``loss`` history (repeats included) and the run's status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("dino")
    (found,) = client.search_runs([exp.experiment_id], f"tags.`dino.run_name` = '{run_name}'")
    history = client.get_metric_history(found.info.run_id, "loss")
    return [x.step for x in history], found.info.status


@pytest.mark.budget(150)
def test_mlflow_server_killed_mid_run_buffers_and_flushes_after_restart(
    tmp_path, caplog, one_torch_thread
):
    """``mlflow server`` (sqlite backend) is killed at step 10 and restarted on the same port
    with the same store while the loop trains on (in process: the buffering is the Tracker's,
    the same object a Ray worker holds): the metrics of the outage are buffered and arrive
    after the restart, every step once. The restart runs beside training; two steps before
    the end the loop waits for it, so that some steps are logged with the server back."""
    from service.tracking import MLflowTracker
    from service.train.context import InProcessContext
    from service.train.loop import Loop

    port, db = stack.free_port(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    total = 8 * MLFLOW_EPOCHS
    servers: list[stack.Service] = []
    times: dict[str, float] = {}
    logged: list[tuple[float, int]] = []

    def start_server() -> None:
        servers.append(stack.start_mlflow(tmp_path / "mlflow", db, str(tmp_path / "mlartifacts"),
                                          port=port))
        times.setdefault("back", time.monotonic()) if len(servers) > 1 else None

    restart = threading.Thread(target=start_server, daemon=True)

    class Outage(MLflowTracker):
        def log_metrics(self, metrics, step: int) -> None:
            super().log_metrics(metrics, step)
            if "loss" in metrics:
                logged.append((time.monotonic(), step))
            if step == 10 and "loss" in metrics:
                stack.stop(servers[-1], grace=0)
                times["down"] = time.monotonic()
                restart.start()
            if step == total - 2 and "loss" in metrics:
                restart.join(timeout=120)

    start_server()
    try:
        from service.config import load_config

        cfg = load_config(None, None, [*TINY, f"storage.root={tmp_path / 'runs'}", "run_name=mlf",
                                       f"train.epochs={MLFLOW_EPOCHS}",
                                       "train.checkpoint_every_epochs=0", "data.num_workers=0",
                                       f"tracking.uri={servers[-1].tracking_uri}"])
        tracker = Outage.start(servers[-1].tracking_uri, "dino", "mlf", None)
        run_url = str(tmp_path / "runs" / "mlf")
        with caplog.at_level("WARNING", logger="service.tracking.mlflow_tracker"):
            Loop(cfg, InProcessContext(run_url), run_url, tracker).run()
            tracker.end()
        history, status = _loss_steps(servers[-1].tracking_uri, "mlf")
    finally:
        restart.join(timeout=120)
        for server in servers:
            stack.stop(server)
    down_at, back_at = times["down"], times["back"]
    down_steps = [s for t, s in logged if down_at < t < back_at]
    after_back = [s for t, s in logged if t >= back_at]
    assert "unreachable" in caplog.text and down_steps, caplog.text[-3000:]
    assert after_back, "training ended before the server was back"
    m = re.search(r"MLflow back after (\d+) s; flushed (\d+) buffered metric values",
                  caplog.text)
    assert m, caplog.text[-3000:]
    assert sorted(set(history)) == list(range(1, total + 1)), sorted(
        set(range(1, total + 1)) - set(history))
    assert status == "FINISHED"
    print(f"\nMLflow killed after step 10, back (restarted, /health) {back_at - down_at:.1f} s "
          f"later; steps {down_steps[0]}..{down_steps[-1]} trained meanwhile; Tracker: "
          f"'MLflow back after {m.group(1)} s; flushed {m.group(2)} buffered metric values'; "
          f"loss history has {len(history)} points for steps 1..{total}, run status {status}")


# ---------------------------------------------------------------------------- sqlite race

_FIRST_RUN = """
import pathlib, sys, time
from service.tracking import MLflowTracker as Tracker
import mlflow.store.tracking.sqlalchemy_store  # the slow imports, before the start line
uri, name, sync = sys.argv[1:4]
pathlib.Path(sync, name).touch()
while not pathlib.Path(sync, "go").exists():
    time.sleep(0.001)
print("run", Tracker.start(uri, "dino", name, None).run_id)
"""


@pytest.mark.budget(150)
def test_two_first_runs_on_a_fresh_sqlite_store_both_start(tmp_path):
    """Two processes start the first runs of a fresh ``sqlite:///`` store at the same moment
    (real MLflow: both create its tables); without the lock in Tracker.start one of them
    crashed with "duplicate column name" / "_alembic_tmp_* already exists" 4 times out of 4."""
    from mlflow.tracking import MlflowClient

    for trial in range(2):
        d = tmp_path / f"t{trial}"
        (d / "sync").mkdir(parents=True)
        uri = f"sqlite:///{d / 'mlflow.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", _FIRST_RUN, uri, name, str(d / "sync")],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
                 for name in ("first", "second")]  # fmt: skip
        deadline = time.monotonic() + 120
        while not all((d / "sync" / n).exists() for n in ("first", "second")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        (d / "sync" / "go").touch()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("dino").experiment_id])
        assert sorted(r.data.tags["dino.run_name"] for r in runs) == ["first", "second"]


if __name__ == "__main__" and sys.argv[1:2] == ["proxy"]:
    _proxy_main(int(sys.argv[2]), int(sys.argv[3]))
