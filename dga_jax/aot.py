"""Compiling for TPUs and GPUs on a host without them, with the targets' own compilers.

`libtpu` (Mosaic and XLA:TPU) compiles for the compile-only devices of a TPU topology; XLA's GPU
compiler, its bundled Triton and `ptxas` compile for a GPU target description. What a kernel
change breaks on real hardware (Mosaic layout rules, VMEM or shared-memory overflow, register
spills, HBM overflow) shows here, and `memory_analysis()` gives per-device memory. Nothing runs.

    devices = target_devices("v5e", chips=4)
    lowered = lower_attention(devices[:1], seq_len=2048, implementation="pallas_tpu")
    print(compile_report("dga forward", lowered, "v5e"))

Needs the `aot` extra (libtpu, the CUDA plugin and ptxas, pinned to the JAX they were built
with), best in a venv of its own (`make aot` / `make test-aot` build `.venv-aot`), and a CPU
host backend: set `JAX_PLATFORMS=cpu` before JAX starts. `benchmarks/aot_compile.py` runs the
whole matrix. Device memory is compared with all of a GPU's; JAX's allocator takes 75% of it
unless `XLA_PYTHON_CLIENT_MEM_FRACTION` says otherwise. What a compile produced (collectives,
buffers, the GPU kernels' registers and spills) is read back by `dga_jax.compile_stats`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.topologies import get_topology_desc
from jax.sharding import NamedSharding, PartitionSpec

from dga_jax.compile_stats import (
    MEMORY_FIELDS,
    KernelStats,
    kernel_stats,
    largest_buffers,
    memory_sizes,
    xla_peak_bytes,
)
from dga_jax.ops.dense import dense_attention
from dga_jax.ops.dga.api import dga_attention
from dga_jax.ops.dga.sharded import per_shard
from dga_jax.ops.sinks import SinkConfig, sink_attention
from dga_jax.ops.tiles import BlockSizes
from dga_jax.sharding import make_mesh

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A compilation target: platform, memory per device, and how to describe its devices."""

    platform: str  # "tpu" or "gpu"
    device_memory_bytes: int
    topologies: dict[int, str]  # TPU: chips -> topology name; GPU: unused
    chip_config: str = "default"  # TPU: "megacore" where two TensorCores act as one device
    device_kind: str = ""  # GPU: XLA's device kind
    arch: str = ""  # GPU: ptxas's target


TARGETS = {
    "v4": TargetSpec("tpu", 32 * GIB, {4: "v4:2x2x1", 8: "v4:2x2x2"}, "megacore"),
    "v5e": TargetSpec("tpu", 16 * GIB, {4: "v5e:2x2", 8: "v5e:2x4"}),
    "v5p": TargetSpec("tpu", 95 * GIB, {4: "v5:2x2x1", 8: "v5:2x2x2"}, "megacore"),
    "v6e": TargetSpec("tpu", 32 * GIB, {4: "v6e:2x2", 8: "v6e:2x4"}),
    # Device memory as CUDA reports it (what XLA's allocator can have), not the marketing size.
    "h100": TargetSpec("gpu", 84_942_979_072, {}, device_kind="NVIDIA H100 80GB HBM3", arch="90a"),
    "h200": TargetSpec("gpu", 150_754_820_096, {}, device_kind="NVIDIA H200", arch="90a"),
}

# XLA's GpuTargetConfigProto (text) for an SXM Hopper: openxla/xla's
# xla/backends/gpu/target_config/specs/h100_sxm.txtpb, less what jaxlib 0.10 does not parse.
_HOPPER_SPEC = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: %d shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "%s"
"""


def target_devices(target: str, chips: int = 4) -> list[jax.Device]:
    """`chips` compile-only devices of `target` (a key of `TARGETS`), one per chip."""
    spec = check_target(target, chips)
    if spec.platform == "gpu":
        config = _HOPPER_SPEC % (spec.device_memory_bytes, spec.device_kind)
        desc = get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{chips}")
        return list(desc.devices)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: a topology only
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to lock: processes share
    desc = get_topology_desc(
        platform="tpu",
        topology_name=spec.topologies[chips],
        chip_config_name=spec.chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    return list(desc.devices)


def lower_attention(
    devices: Sequence[jax.Device],
    *,
    seq_len: int,
    implementation: str,
    selection: str = "global",
    gradient: bool = False,
    block_sizes: BlockSizes | None = None,
    batch: int = 1,
    heads: int = 4,
    kv_heads: int = 4,
    head_dim: int = 128,
    dtype=jnp.bfloat16,
    sinks: SinkConfig | None = None,
) -> jax.stages.Lowered:
    """`dga_attention` (or its gradient in q, k, v) on `devices[0]`, lowered from shapes alone;
    with `sinks`, that baseline's `sink_attention` instead (q, k also scoring the first tokens:
    the kernels' two-query path)."""
    mesh = jax.sharding.Mesh(list(devices[:1]), ("devices",))
    sharding = NamedSharding(mesh, PartitionSpec())
    q = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), dtype, sharding=sharding)
    options = dict(implementation=implementation, block_sizes=block_sizes)

    def attention(q, k, v):
        if sinks is not None:
            return sink_attention(q, k, v, q, k, sinks, **options)
        return dga_attention(q, k, v, selection=selection, **options)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1, 2)) if gradient else attention
    with jax.set_mesh(mesh):
        return jax.jit(fn).trace(q, kv, kv).lower()


def lower_context_attention(
    devices: Sequence[jax.Device],
    mesh_shape: tuple[int, int, int, int],
    *,
    strategy: str,
    seq_len: int,
    attention: str = "dga",
    implementation: str | None = None,
    selection: str = "global",
    gradient: bool = True,
    batch: int = 1,
    heads: int = 32,
    kv_heads: int = 32,
    head_dim: int = 128,
    group_size: int = 16,
    focal_ratio: float = 0.1,
    dtype=jnp.bfloat16,
) -> jax.stages.Lowered:
    """Attention (or its gradient) as `DGAttention` runs it on a (data, fsdp, seq, tensor) mesh
    of `devices` with context-parallel `strategy`, lowered from shapes alone."""
    mesh = make_mesh(mesh_shape, devices=devices[: math.prod(mesh_shape)])
    spec = PartitionSpec(("data", "fsdp"), "seq", "tensor", None)
    sharding = NamedSharding(mesh, spec)
    q = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), dtype, sharding=sharding)

    def core(q, k, v, split):
        if attention == "dense":
            return dense_attention(q, k, v, implementation=implementation, split=split)
        return dga_attention(
            q,
            k,
            v,
            group_size=group_size,
            focal_ratio=focal_ratio,
            selection=selection,
            implementation=implementation,
            split=split,
        )

    def forward(q, k, v):
        axes = dict(batch=("data", "fsdp"), seq="seq", heads="tensor")
        return per_shard(core, q, k, v, strategy=strategy, **axes)

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v).astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1, 2)) if gradient else forward
    with jax.set_mesh(mesh):
        return (
            jax.jit(fn, out_shardings=sharding if not gradient else (sharding,) * 3)
            .trace(q, kv, kv)
            .lower()
        )


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """The outcome of one compile for one target; memory is per device, in bytes."""

    label: str
    target: str
    ok: bool
    seconds: float
    error: str | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None
    peak_bytes: int | None = None
    device_memory_bytes: int | None = None
    kernels: tuple[KernelStats, ...] = ()
    largest: tuple[str, ...] = ()  # the biggest temporaries: "MiB: shapes"

    def __str__(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        line = f"{status} {self.target} {self.label}: {self.seconds:.1f}s"
        if self.peak_bytes is not None:
            line += (
                f"  peak {self.peak_bytes / 2**20:,.1f} MiB of "
                f"{self.device_memory_bytes / 2**20:,.0f} (args {self.argument_bytes / 2**20:,.1f},"
                f" temp {self.temp_bytes / 2**20:,.1f})"
            )
        line += "".join(f"\n     buffer {buffer}" for buffer in self.largest)
        for k in self.kernels:
            line += (
                f"\n     {k.name}: {k.threads} threads, smem {k.shared_memory_bytes:,} B, "
                f"registers {k.registers}, "
                f"spills {k.spill_bytes} B" + "".join(f"\n       {w}" for w in k.warnings)
            )
        return line + (f"\n  {self.error}" if self.error else "")


def compile_report(label: str, lowered: jax.stages.Lowered, target: str) -> CompileReport:
    """Compiles `lowered` for `target`; failures (compile errors, overflows) are reported.

    From XLA's dump of the compile: the largest buffers (what dominates the peak); on GPU
    targets the Pallas kernels' shared memory, registers and spills (`ptxas -v` on the PTX XLA
    compiled), and device memory against the GPU's, which XLA does not check without a device.
    """
    spec = _spec(target)
    with tempfile.TemporaryDirectory() as dump:
        options = {"xla_dump_to": dump}
        start = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options=options)
        except Exception as error:  # the compiler's verdict is the report
            seconds = time.perf_counter() - start
            return CompileReport(label, target, ok=False, seconds=seconds, error=_summary(error))
        seconds = time.perf_counter() - start
        kernels = kernel_stats(Path(dump), spec.arch) if spec.platform == "gpu" else ()
        largest = largest_buffers(Path(dump))
    memory = memory_sizes(compiled) or dict.fromkeys(MEMORY_FIELDS)  # None: the backend has none
    peak = xla_peak_bytes(compiled)
    error = _memory_error(peak, target, spec)
    spilled = [k.name for k in kernels if k.spill_bytes]
    if spilled:
        error = (error + "; " if error else "") + f"register spills in {', '.join(spilled)}"
    return CompileReport(
        label,
        target,
        ok=error is None,
        seconds=seconds,
        error=error,
        argument_bytes=memory["argument_size_in_bytes"],
        output_bytes=memory["output_size_in_bytes"],
        temp_bytes=memory["temp_size_in_bytes"],
        alias_bytes=memory["alias_size_in_bytes"],
        peak_bytes=peak,
        device_memory_bytes=spec.device_memory_bytes,
        kernels=kernels,
        largest=largest,
    )


def _memory_error(peak: int | None, target: str, spec: TargetSpec) -> str | None:
    """Why the compile cannot run on `target` for lack of device memory, if it cannot. XLA:TPU
    refuses such a compile itself; a deviceless GPU compile does not check, so a GPU target
    without a memory analysis is unchecked, and says so."""
    if peak is None and spec.platform == "gpu":
        return f"no memory analysis from the compiler: {target}'s device memory unchecked"
    if peak is None or peak <= spec.device_memory_bytes:
        return None
    return (
        f"needs {peak:,} bytes ({peak / GIB:,.2f} GiB) per device; {target} has "
        f"{spec.device_memory_bytes:,} ({spec.device_memory_bytes / GIB:,.2f} GiB)"
    )


def check_target(target: str, chips: int) -> TargetSpec:
    """`target`'s spec; a ValueError naming the target and the chip counts it has otherwise
    (before any compile: XLA's own errors for a bad count do not name it)."""
    spec = _spec(target)
    if spec.platform == "gpu" and not (isinstance(chips, int) and chips >= 1):
        raise ValueError(f"{target}: chips must be an int >= 1, got {chips!r}")
    if spec.platform == "tpu" and chips not in spec.topologies:
        raise ValueError(f"{target}: chips must be one of {sorted(spec.topologies)}, got {chips}")
    return spec


def _spec(target: str) -> TargetSpec:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    return TARGETS[target]


def _summary(error: Exception) -> str:
    """The compiler's message, without the HLO it quotes at length."""
    text = f"{type(error).__name__}: {error}"
    lines = [line[:300] for line in text.splitlines() if line.strip()]
    return "\n  ".join(lines[:6])
