"""Training gives the same losses on every mesh, and as one process or two, on fake CPU devices.

Each run is `python -m train` in a subprocess of its own, because the fake device count
(`--xla_force_host_platform_device_count`) must be set before JAX starts. The per-step losses and
gradient norms, and the final validation loss, are read back from the run's `metrics.jsonl` and
compared in float32 with the project's fixed tolerances.

A run takes ~30 s of one core (start-up, compiling the train and eval steps, a checkpoint), so
runs go two at a time, and the single-process runs are cached for the whole module: the
multi-host test reuses the mesh agreement test's run on the same mesh as its reference.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dga_jax.data.pipeline import DataConfig, make_train_iterator
from tests.conftest import FORWARD_TOL, GRAD_TOL
from tests.data.conftest import record, write_jsonl_zst

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"dense": "configs/tiny_dense.py", "dga": "configs/tiny_dga.py"}
STEPS = 3
# (data, fsdp, seq, tensor). `MeshConfig.shape` rejects a mesh smaller than the device count, so
# (1, 1, 1, 1) is the reference run on a single device rather than one device of eight.
MESHES = ((8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 1, 1))
REFERENCE_MESH = (1, 1, 1, 1)
MULTI_HOST_MESH = (2, 2, 2, 1)
PARALLEL_PROCESSES = 2  # the CI machine's cores; compiling is mostly single-threaded
TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Run:
    """One training job: a config, its mesh, and over how many processes it runs."""

    attention: str
    mesh: tuple[int, int, int, int]
    num_processes: int = 1
    extra: tuple[tuple[str, object], ...] = ()  # more `--config.key=value` settings

    @property
    def name(self) -> str:
        mesh = "x".join(map(str, self.mesh))
        extra = "".join(f"_{key}={value}" for key, value in self.extra)
        return f"{self.attention}_{mesh}_{self.num_processes}proc{extra}"

    def flags(self, workdir: Path) -> list[str]:
        """`python -m train` flags: 3 steps of 8 x 64 tokens, each logged; one eval batch."""
        data, fsdp, seq, tensor = self.mesh
        settings = {
            "mesh.data": data,
            "mesh.fsdp": fsdp,
            "mesh.seq": seq,
            "mesh.tensor": tensor,
            "data.seq_len": 64,  # divisible by seq=4 and by DGA's group size 16
            "train.steps": STEPS,
            "train.global_batch_size": 8,
            "train.log_every": 1,
            "train.eval_every": 1000,  # the last step still evaluates: one val_loss to compare
            "train.eval_batches": 1,
            "train.checkpoint_every": 1000,
            "train.keep_checkpoints": 1,
            # No warmup: full-size AdamW updates from the first step, so steps 2 and 3 also
            # check that the update is the same on every mesh. A constant schedule, so that a
            # run stopped after step 2 sees the same learning rates (the resume test reuses
            # the two-process run).
            "optim.warmup_steps": 0,
            "optim.schedule": "constant",
            **dict(self.extra),
        }
        return [f"--config={CONFIGS[self.attention]}", f"--workdir={workdir}"] + [
            f"--config.{key}={value}" for key, value in settings.items()
        ]


@dataclasses.dataclass(frozen=True)
class Curve:
    """What a run logged: per-step train losses and gradient norms, and the last val_loss."""

    losses: np.ndarray  # float [STEPS]
    grad_norms: np.ndarray  # float [STEPS]
    val_loss: float


def read_curve(metrics: Path) -> Curve:
    """The curve in a `metrics.jsonl`, which must log every step once and one val_loss."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), records
    assert [r["step"] for r in val] == [STEPS], records
    return Curve(
        np.array([r["loss"] for r in train]),
        np.array([r["grad_norm"] for r in train]),
        val[0]["val_loss"],
    )


def free_port() -> int:
    """A TCP port nothing listens on now, for the coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(run: Run, workdir: Path, log: Path, process_id: int, port: int) -> subprocess.Popen:
    """Starts process `process_id` of `run` on `prod(mesh) / num_processes` fake CPU devices."""
    devices = math.prod(run.mesh) // run.num_processes
    xla_flags = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags.strip(), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "train", *run.flags(workdir)]
    if run.num_processes > 1:
        command += [
            "--distributed",
            f"--coordinator_address=localhost:{port}",
            f"--num_processes={run.num_processes}",
            f"--process_id={process_id}",
        ]
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def train(run: Run, root: Path, workdir: Path | None = None) -> Curve:
    """Runs `run` to the end (all its processes share one workdir, as on a shared filesystem).

    Only process 0 writes `metrics.jsonl`. A failure or a timeout fails with every process's
    output tail. An existing `workdir` is resumed from its newest checkpoint.
    """
    if workdir is None:
        workdir = root / run.name
        workdir.mkdir()
    port = free_port()
    logs = [root / f"{run.name}.process{i}.log" for i in range(run.num_processes)]
    processes = [launch(run, workdir, log, i, port) for i, log in enumerate(logs)]
    try:
        codes = wait_all(processes)
    finally:
        for process in processes:
            process.kill()  # a no-op for those that finished
            process.wait()
    tails = "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs)
    assert codes == [0] * run.num_processes, f"{run.name}: exit codes {codes}\n{tails}"
    return None if dict(run.extra).get("train.steps") else read_curve(workdir / "metrics.jsonl")


def wait_all(processes: list[subprocess.Popen]) -> list[int | None]:
    """Exit codes (None: still running at the timeout), as soon as all end or one fails.

    A process whose peer failed would wait for it until the timeout; this does not.
    """
    deadline = time.monotonic() + TIMEOUT_S
    codes = [p.poll() for p in processes]
    while None in codes and not any(codes) and time.monotonic() < deadline:
        time.sleep(0.5)
        codes = [p.poll() for p in processes]
    return codes


class Runs:
    """Curves by `Run`, each trained once per module; uncached ones train concurrently."""

    def __init__(self, root: Path):
        self.root = root
        self.curves: dict[Run, Curve] = {}

    def get(self, runs: list[Run]) -> list[Curve]:
        missing = [run for run in runs if run not in self.curves]
        # A two-process run holds both its processes, so it takes the whole machine.
        workers = max(1, PARALLEL_PROCESSES // max((r.num_processes for r in missing), default=1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {run: pool.submit(train, run, self.root) for run in missing}
            for run, future in futures.items():
                self.curves[run] = future.result()
        return [self.curves[run] for run in runs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


def assert_same_curve(actual: Curve, expected: Curve, what: str) -> None:
    """Losses and validation loss within FORWARD_TOL, gradient norms within GRAD_TOL; no NaN."""
    for name, tol in (("losses", FORWARD_TOL), ("grad_norms", GRAD_TOL), ("val_loss", FORWARD_TOL)):
        np.testing.assert_allclose(
            getattr(actual, name),
            getattr(expected, name),
            **tol[jnp.float32],
            equal_nan=False,
            err_msg=f"{what}: {name}",
        )


# The mesh and the process count change how the train step is split, not the attention: one
# kind (DGA, whose selection crosses devices) covers them; dense attention's sharded paths run
# in the context-parallel test below and in tests/ops/test_context_parallel.py.
@pytest.mark.parametrize("attention", ["dga"])
def test_every_mesh_gives_the_same_losses(runs, attention):
    """Data, FSDP and sequence parallelism on 8 devices train exactly as one device does."""
    meshes = [Run(attention, mesh) for mesh in MESHES]
    curves = dict(zip(MESHES, runs.get(meshes), strict=True))
    reference = curves[REFERENCE_MESH]
    for mesh, curve in curves.items():
        print(f"{attention} {mesh}: losses {curve.losses.tolist()}, val {curve.val_loss}")
        assert_same_curve(curve, reference, f"{attention} on mesh {mesh}")
    # It trains: with full-size updates from step 1 the loss falls by ~1.2 nats in two steps.
    assert reference.losses[-1] < reference.losses[0] - 0.5, reference.losses


@pytest.mark.parametrize("attention", sorted(CONFIGS))
def test_each_context_parallel_strategy_gives_the_same_losses(runs, attention):
    """On (2, 2, 2, 1) "auto" runs Ulysses (the tiny model's 2 KV heads split 2 ways) and the
    native "dga" strategy keeps the sequence split through the attention; on (1, 2, 4, 1) the
    rows are in zig-zag order (the batch permuted once, positions following). The mesh test's
    seq = 4 and 8 runs are "dga" under "auto": 2 KV heads cannot split 4 ways."""
    runs_ = {
        "ulysses": Run(attention, MULTI_HOST_MESH),
        "dga": Run(attention, MULTI_HOST_MESH, extra=(("mesh.context_parallel", "dga"),)),
        "zigzag": Run(attention, (1, 2, 4, 1), extra=(("mesh.context_order", "zigzag"),)),
    }
    reference, *curves = runs.get([Run(attention, REFERENCE_MESH), *runs_.values()])
    for name, curve in zip(runs_, curves, strict=True):
        print(f"{attention} {name}: losses {curve.losses.tolist()}, val {curve.val_loss}")
        assert_same_curve(curve, reference, f"{attention}, {name}")


@pytest.mark.parametrize("attention", ["dga"])
def test_two_processes_give_the_same_losses_as_one(runs, attention):
    """`--distributed` with 2 processes of 4 devices trains as 1 process of 8 on that mesh."""
    single = Run(attention, MULTI_HOST_MESH)
    multi = Run(attention, MULTI_HOST_MESH, num_processes=2)
    expected, actual = runs.get([single, multi])
    print(f"{attention} 2 processes: losses {actual.losses.tolist()}, val {actual.val_loss}")
    assert_same_curve(actual, expected, f"{attention}, 2 processes of 4 devices")


def test_sequence_sharded_across_processes(runs):
    """Mesh (1, 1, 8, 1) on 2 processes of 4 devices: each process holds half of every row.

    Context parallelism across hosts: each process must feed its devices their slice of the
    sequence of every row, not whole rows of its own. Compared with the single-device run, which
    the mesh test shows every 8-device mesh matches.
    """
    expected, actual = runs.get([Run("dga", REFERENCE_MESH), Run("dga", (1, 1, 8, 1), 2)])
    print(f"dga (1, 1, 8, 1), 2 processes: losses {actual.losses.tolist()}")
    assert_same_curve(actual, expected, "dga, sequence over 2 processes")


def test_two_processes_resume_exactly(runs, tmp_path):
    """A 2-process run stopped after step 2 and restarted in its workdir trains step 3 exactly
    as an uninterrupted run: parameters, optimizer state and every process's data rows resume.

    The reference is the uninterrupted two-process run of the test above.
    """
    (expected,) = runs.get([Run("dga", MULTI_HOST_MESH, 2)])
    workdir = tmp_path / "resumed"
    workdir.mkdir()
    train(Run("dga", MULTI_HOST_MESH, 2, extra=(("train.steps", 2),)), tmp_path, workdir)
    (workdir / "metrics.jsonl").write_text(
        "".join(
            line + "\n"
            for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if "val_loss" not in line
        )  # the first part's final evaluation, at step 2
    )
    resumed = train(Run("dga", MULTI_HOST_MESH, 2), tmp_path, workdir)
    assert_same_curve(resumed, expected, "dga, 2 processes, resumed after step 2")


def run_script(script: str, tmp_path: Path, *args: object) -> tuple[list[int], list[str], float]:
    """Runs `script` as 2 processes of 1 CPU device (argv: port, process id, `args`); their exit
    codes, outputs and seconds taken. Killed after 60 s: a hang fails the test, not the session."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port, logs = free_port(), [tmp_path / f"process{i}.log" for i in range(2)]
    processes = []
    for i, log in enumerate(logs):
        with log.open("w") as out:
            command = [sys.executable, "-c", script, str(port), str(i), *map(str, args)]
            processes.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    began = time.monotonic()
    try:
        codes = [process.wait(timeout=60) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return codes, [log.read_text() for log in logs], time.monotonic() - began


# Two processes that gather once, then `failing` raises where the other gathers again. With
# none failing, both first fail in a block of their own and handle it: the next block must
# not take that failure for its own (one key for all blocks ended both at once).
FAIL_ONE_PROCESS = """
import sys
import time
import jax
from train.hosts import any_process, fail_together
port, process_id, failing = map(int, sys.argv[1:])  # failing: -1 for none
jax.distributed.initialize(f"localhost:{port}", 2, process_id)
if failing == -1:
    try:
        with fail_together():
            any_process(True)
            raise ValueError("handled")
    except ValueError:
        any_process(True)
with fail_together():
    if failing == -1:
        time.sleep(3)  # longer than a watcher's grace before it ends its process
    any_process(True)
    if process_id == failing:
        raise RuntimeError(f"unreadable shard on process {process_id}")
    any_process(False)
"""


@pytest.mark.parametrize("failing", [0, 1, None])
def test_a_failure_on_one_process_ends_every_process(tmp_path, failing):
    """The other process was stuck in its gather forever, and the failed one in JAX's shutdown
    barrier (~100 s for the coordinator, process 0): now both end within seconds, the other
    one saying which process failed and why."""
    codes, logs, seconds = run_script(
        FAIL_ONE_PROCESS, tmp_path, -1 if failing is None else failing
    )
    if failing is None:  # the watcher ends no run that does not fail, nor after a handled one
        assert codes == [0, 0], logs
        return
    assert codes == [1, 1] and seconds < 30, (codes, seconds, logs)
    assert f"unreadable shard on process {failing}" in logs[failing]
    assert f"error: process {failing} failed: RuntimeError: unreadable shard" in logs[1 - failing]


# Checkpoints of steps 1 and 2, then a restart where process 1 cannot read step 2's data state.
RESTORE_UNREADABLE_ON_ONE = """
import sys
import jax
import numpy as np
import orbax.checkpoint as ocp
from train.checkpointing import Checkpoints
from train.step import TrainState
port, process_id, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", 2, process_id)
sharding = jax.sharding.NamedSharding(jax.make_mesh((2,), ("data",)), jax.P())
def replicated(value):
    return jax.make_array_from_callback(np.shape(value), sharding, lambda index: value[index])
zero = replicated(np.int32(0))
state = TrainState(zero, {"w": replicated(np.ones(2, np.float32))}, {}, zero, zero)
checkpoints = Checkpoints(directory, every=1, keep=5)
for step in (1, 2):
    checkpoints.save(step, state, lambda: {"rows": {}}, {})
checkpoints.close()
read_json = ocp.JsonCheckpointHandler.restore
def unreadable_on_process_1(self, path, *args, **kwargs):
    if process_id == 1 and "/2/" in f"{path}/":
        raise OSError("Input/output error")
    return read_json(self, path, *args, **kwargs)
checkpoints = Checkpoints(directory, every=1, keep=5)
ocp.JsonCheckpointHandler.restore = unreadable_on_process_1
abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
print("restored step", checkpoints.restore_newest(abstract)[0], "of", checkpoints.steps())
checkpoints.close()
"""


def test_a_checkpoint_unreadable_on_one_process_is_skipped_by_all(tmp_path):
    """Process 1's failed read skipped the barrier ending Orbax's restore: process 0's barrier
    met process 1's gather (`sync_global_devices name mismatch`), step 1 was also called
    damaged on process 1, and process 0 hung. Now both restore step 1 and move step 2 aside."""
    codes, logs, _ = run_script(RESTORE_UNREADABLE_ON_ONE, tmp_path, tmp_path / "checkpoints")
    assert codes == [0, 0], logs
    for log in logs:
        assert "restored step 1 of [1]" in log, logs
    assert "Input/output error" in logs[1]
    assert "failed to restore on another process" in logs[0]
    assert (tmp_path / "damaged_checkpoints" / "2").is_dir()


# Three batches of process `process_id`'s rows of a shard with broken lines, and what the
# trainer logs as `skipped_records` then.
SKIPPED_RECORDS = """
import sys
import jax
from dga_jax.data.pipeline import DataConfig, make_train_iterator
from train.trainer import _skipped_records
port, process_id, shard = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", 2, process_id)
config = DataConfig(seq_len=32, global_batch_size=4, train=shard, validation=shard)
it = make_train_iterator(config, process_index=process_id, process_count=2)
for _ in range(3):
    next(it)
print("own", it.stats.skipped, "logged", _skipped_records(it)["skipped_records"])
"""


def test_skipped_records_are_counted_over_every_process(tmp_path):
    """metrics.jsonl's `skipped_records` counted process 0's rows only."""
    lines = [b"{broken" if i % 3 == 0 else record(f"document {i} " * 8) for i in range(60)]
    shard = write_jsonl_zst(tmp_path / "train.jsonl.zst", lines)
    config = DataConfig(seq_len=32, global_batch_size=4, train=str(shard), validation=str(shard))
    whole = make_train_iterator(config)
    for _ in range(3):
        next(whole)
    codes, logs, _ = run_script(SKIPPED_RECORDS, tmp_path, shard)
    assert codes == [0, 0], logs
    own = [int(re.search(r"own (\d+)", log).group(1)) for log in logs]
    assert 0 < own[0] < whole.stats.skipped and sum(own) == whole.stats.skipped, (own, logs)
    for log in logs:
        assert f"logged {whole.stats.skipped}" in log, logs
