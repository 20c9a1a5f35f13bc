"""Shared test helpers: random inputs and the project's fixed tolerances."""

from __future__ import annotations

import gc
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from jax.experimental.pallas import tpu as pltpu

from dga_jax.ops.dense_decode import DenseCache

# The test process is the entry point: absl's flags keep their defaults (Grain's workers read one).
flags.FLAGS.mark_as_parsed()

# One persistent compilation cache per test run, shared by the pytest workers and every process
# they start: the trainers, converters and fake-device scripts of many tests compile the same
# programs, each in a new process. A cached executable is the compiled program itself (keyed by
# its HLO, the XLA flags and the devices), so results are the same; the run that made the
# directory deletes it at the end. A JAX_COMPILATION_CACHE_DIR of the caller's is used and kept.
# The maker is known in this process only (not from the environment, which the workers and any
# pytest a test starts inherit: such a pytest removed the cache mid-run).
_MADE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _MADE_CACHE = tempfile.mkdtemp(prefix="dga-jax-tests-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _MADE_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


def pytest_sessionfinish(session):
    """The process that made this run's compilation cache removes it (a pytest-xdist worker,
    or a pytest a test starts, found it made)."""
    if _MADE_CACHE is not None:
        shutil.rmtree(_MADE_CACHE, ignore_errors=True)


# Fixed per dtype; never loosened to make a test pass.
FORWARD_TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# Gradients see two more roundings (the p/ds casts and the output), hence 2x.
GRAD_TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# On a GPU the Triton kernels run compiled (the suite then checks Triton's code, not only the
# logic), elsewhere interpreted. f32 matmuls there use IEEE precision, not TF32: the float32
# tolerances above hold for float32 arithmetic.
ON_GPU = jax.default_backend() == "gpu"
GPU_INTERPRET = not ON_GPU
if ON_GPU:
    jax.config.update("jax_default_matmul_precision", "highest")
# Tests check behaviour, not speed: their programs are small and mostly compiled for one or two
# calls, so the compiler backend's (LLVM's) expensive optimizations cost more than they save (a
# fifth or more of a fake-device test's time). XLA's HLO passes (fusion, sharding, collectives,
# buffer assignment) still run: the optimized HLO, and so the memory and collective checks, are
# those users get; only the machine code differs. On CPU only (on a GPU the suite checks the
# kernels' compiled code), and set for the processes tests start too; `tests/aot` compiles for
# hardware targets fully optimized. JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the whole suite so.
# (`jax_disable_most_optimizations` is an undocumented JAX flag; it has existed since 2020.)
# `import jax` has already rejected a value that is not a boolean; unset means on here.
FEW_OPTIMIZATIONS = not ON_GPU and os.environ.get(
    "JAX_DISABLE_MOST_OPTIMIZATIONS", "1"
).lower() in ("1", "true", "t", "yes", "y", "on")
if FEW_OPTIMIZATIONS:
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update("jax_disable_most_optimizations", FEW_OPTIMIZATIONS)


@pytest.fixture
def optimized():
    """A test's programs compiled as users get them, LLVM's optimizations on (fused
    multiply-adds among them), where the suite turns them off; restored after the test. Jit
    inside the test: a function compiled before may be reused as it was compiled."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


# The TPU interpreter with its checks on: data races between DMAs and grid steps (reported by
# printing RACE_REPORT, which `pytest_runtest_makereport` turns into a failure), out-of-bounds
# reads (raise).
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")
RACE_REPORT = "RACE DETECTED"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fails a test during which the TPU interpreter's race detector reported a race.

    The detector prints its report and sets a flag that the next kernel call resets; it never
    raises, so without this a racy kernel would pass every test.
    """
    report = yield
    captured = report.capstdout + report.capstderr
    if report.when == "call" and report.passed and RACE_REPORT in captured:
        report.outcome = "failed"
        report.longrepr = "the TPU interpreter detected a data race (see the captured output)"
    return report


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_caches():
    """Each test module starts with JAX's caches empty: a pytest worker runs hundreds of
    modules' programs, and keeping every executable alive only grows its memory."""
    jax.clear_caches()


def _map_limit() -> int | None:
    """Linux's limit on a process's memory mappings (None off Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except OSError:
        return None


MAP_LIMIT = _map_limit()


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
    """JAX's caches are emptied after a test that leaves the process past half its limit on
    memory mappings. XLA:CPU maps three regions per JIT-compiled module, and a program running a
    Pallas kernel in interpret mode has hundreds of modules: a conformance test's compiles took
    ~500 mappings, kept until the module ended, and a worker running most of that module reached
    Linux's vm.max_map_count (65,530): XLA's next mmap failed, and the C++ exception reporting it
    crashed the worker in the unwinder (frames of freed executables still registered)."""
    yield
    if MAP_LIMIT is None:
        return
    with open("/proc/self/maps", "rb") as maps:
        if sum(1 for _ in maps) > MAP_LIMIT // 2:
            jax.clear_caches()
            gc.collect()


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_fake_devices(script: str, devices: int = 8) -> None:
    """Runs Python `script` in a new process on `devices` fake CPU devices (set before JAX
    starts, hence the process); it must exit 0 and print "ok" last."""
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok"), result.stdout[-3000:]


def random_qkv(seed: int, b: int, seq_len: int, hq: int, hkv: int, d: int, dtype=jnp.float32):
    """q [B, L, Hq, D], k, v [B, L, Hkv, D] standard normal."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(kq, (b, seq_len, hq, d), dtype),
        jax.random.normal(kk, (b, seq_len, hkv, d), dtype),
        jax.random.normal(kv, (b, seq_len, hkv, d), dtype),
    )


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tol
    )


def cache_row(cache, row: int) -> dict[str, np.ndarray]:
    """The parts of row `row` of one layer's DGACache or DenseCache that decoding reads."""
    if isinstance(cache, DenseCache):
        n = int(cache.length[row])
        return dict(k=cache.k[row, :, :n], v=cache.v[row, :, :n], length=cache.length[row])
    prefix, tail = int(cache.prefix_count[row]), int(cache.tail_count[row])
    return dict(
        prefix_k=cache.prefix_k[row, :, :prefix],
        prefix_v=cache.prefix_v[row, :, :prefix],
        prefix_bias=cache.prefix_bias[row, :, :prefix],
        tail_k=cache.tail_k[row, :, :tail],
        tail_v=cache.tail_v[row, :, :tail],
        counts=np.array([prefix, tail, int(cache.length[row])]),
    )
