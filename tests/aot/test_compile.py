"""The kernels and the train step compiled by the real TPU and GPU compilers, on this CPU host.

Runs with the `aot` extra (`make test-aot`, which `.ci/run` calls): Mosaic / XLA:TPU from
libtpu for a v5e topology, XLA:GPU with Triton and ptxas for an H100. Any compile error,
VMEM or shared-memory overflow, or register spill at the default blocks fails.
"""

from __future__ import annotations

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dga_jax import aot, dga_attention
from dga_jax.ops import target as target_module
from dga_jax.ops.sinks import StreamingLLMConfig
from dga_jax.ops.tiles import BlockSizes
from train.config import from_config_dict
from train.setup import lower_train_step

pytestmark = pytest.mark.aot

IMPLEMENTATION = {"v5e": "pallas_tpu", "h100": "pallas_gpu"}
GPU_KERNELS = {"interval_forward", "interval_dq", "interval_dkv_prefix", "interval_dkv_band"}
IMPORTANCE_KERNELS = {"importance_stats", "importance_scores"}  # global selection's two passes
H100 = target_module.Target("gpu", aot.TARGETS["h100"].device_kind)


@pytest.fixture(scope="module", autouse=True)
def _cpu_host():
    assert jax.default_backend() == "cpu", "run with JAX_PLATFORMS=cpu (make test-aot does)"


@pytest.mark.parametrize("gradient", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("selection", ["global", "streaming"])
@pytest.mark.parametrize("target", ["v5e", "h100"])
def test_kernels_compile_at_default_blocks(target, selection, gradient):
    lowered = aot.lower_attention(
        aot.target_devices(target, chips=4),
        seq_len=2048,
        implementation=IMPLEMENTATION[target],
        selection=selection,
        gradient=gradient,
    )
    report = aot.compile_report("kernels", lowered, target)
    assert report.ok, str(report)
    assert 0 < report.peak_bytes < report.device_memory_bytes
    if target == "h100":
        names = {k.name for k in report.kernels}
        walks = GPU_KERNELS if gradient else {"interval_forward"}
        assert names == walks | (IMPORTANCE_KERNELS if selection == "global" else set()), str(
            report
        )
        for kernel in report.kernels:
            assert kernel.spill_bytes == 0 and 0 < kernel.registers <= 255, str(report)
            assert 0 < kernel.shared_memory_bytes <= H100.shared_memory_bytes, str(report)
            assert kernel.threads == 8 * 32, str(report)  # D = 128: 8 warps


@pytest.mark.parametrize("gradient", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("target", ["v5e", "h100"])
def test_sink_kernels_compile_at_default_blocks(target, gradient):
    """The two-query path (the first tokens scored by their own queries): StreamingLLM's."""
    lowered = aot.lower_attention(
        aot.target_devices(target, chips=4),
        seq_len=2048,
        implementation=IMPLEMENTATION[target],
        gradient=gradient,
        sinks=StreamingLLMConfig(start_size=4, recent_size=1000),
    )
    report = aot.compile_report("sink kernels", lowered, target)
    assert report.ok, str(report)
    if target == "h100":
        names = {k.name for k in report.kernels}
        assert names == (GPU_KERNELS if gradient else {"interval_forward"}), str(report)
        for kernel in report.kernels:
            assert kernel.spill_bytes == 0 and 0 < kernel.registers <= 255, str(report)


@pytest.mark.parametrize(
    "target, blocks, seq_len, table, unknown, compiler_says",
    [
        ("h100", BlockSizes(256, 256), 2048, "_SHARED_MEMORY", (), "shared memory"),
        ("v5e", BlockSizes(2048, 2048), 8192, "_SCOPED_VMEM", {}, "vmem"),
    ],
)
def test_rejected_tiles_are_ones_the_compiler_refuses(
    target, blocks, seq_len, table, unknown, compiler_says, monkeypatch
):
    """The up-front check rejects these tiles; without it, the target's compiler fails too."""
    devices = aot.target_devices(target, chips=4)
    lower = dict(seq_len=seq_len, implementation=IMPLEMENTATION[target], block_sizes=blocks)
    with pytest.raises(ValueError, match="use smaller blocks"):
        aot.lower_attention(devices, **lower)
    monkeypatch.setattr(target_module, table, unknown)  # no device kind known: no check
    report = aot.compile_report("unchecked", aot.lower_attention(devices, **lower), target)
    assert not report.ok
    assert compiler_says in report.error.lower(), report.error


def test_target_is_read_from_the_mesh_or_the_inputs():
    devices = aot.target_devices("v5e", chips=4)
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    seen = []

    def record(x):
        seen.append(target_module.placed_target(x))
        return x

    sharded = jax.ShapeDtypeStruct((8,), "float32", sharding=NamedSharding(mesh, PartitionSpec()))
    jax.jit(record).trace(sharded)  # from the input's sharding
    with jax.set_mesh(mesh):
        jax.jit(record).trace(jax.ShapeDtypeStruct((8,), "float32"))  # from the context mesh
    assert seen == [target_module.Target("tpu", "TPU v5 lite")] * 2


@pytest.mark.parametrize(
    ("target", "dtype", "triton"),
    [("h100", "bfloat16", True), ("h100", "float32", False), ("v5e", "bfloat16", False)],
)
def test_the_default_implementation_is_the_triton_kernels_for_16_bit_inputs_on_gpus(
    target, dtype, triton
):
    """implementation=None: "pallas_gpu" (at its 128x64 default tiles, no spill) for bfloat16
    on an H100, "xla" for float32 there and on a TPU (no Mosaic kernel either)."""
    lowered = aot.lower_attention(
        aot.target_devices(target, chips=4), seq_len=2048, implementation=None, dtype=dtype
    )
    assert "tpu_custom_call" not in lowered.as_text()
    report = aot.compile_report("default attention", lowered, target)
    assert report.ok, str(report)
    names = {k.name for k in report.kernels}
    assert names == ({"interval_forward"} | IMPORTANCE_KERNELS if triton else set()), str(report)
    assert all(k.spill_bytes == 0 for k in report.kernels), str(report)


def test_a_launch_reaches_the_compiled_kernels():
    """BlockSizes' num_warps and num_stages: 4 warps are 128 threads per block, and a third
    pipeline stage takes more shared memory than two."""
    devices, kernels = aot.target_devices("h100"), {}
    for stages in (2, 3):
        blocks = BlockSizes(64, 64, num_warps=4, num_stages=stages)
        lowered = aot.lower_attention(
            devices, seq_len=1024, implementation="pallas_gpu", block_sizes=blocks
        )
        report = aot.compile_report(f"{stages} stages", lowered, "h100")
        assert report.ok, str(report)
        kernels[stages] = {k.name: k for k in report.kernels}
    walk = [kernels[stages]["interval_forward"] for stages in (2, 3)]
    assert [k.threads for k in walk] == [4 * 32, 4 * 32]
    assert walk[0].shared_memory_bytes < walk[1].shared_memory_bytes
    assert kernels[2]["importance_stats"].threads == 8 * 32  # importance keeps its launch


def test_kernels_refuse_the_other_platform():
    with pytest.raises(ValueError, match=r"compiles for GPU but the inputs are placed on 'tpu'"):
        aot.lower_attention(aot.target_devices("v5e"), seq_len=256, implementation="pallas_gpu")


@pytest.mark.parametrize("target", ["v5e", "h100"])
def test_tiny_train_step_compiles_on_four_devices(target):
    from configs import tiny_dga

    config = tiny_dga.get_config()
    config.model.overrides.attention_impl = IMPLEMENTATION[target]
    config.model.overrides.dtype = "bfloat16"
    config.mesh.update(data=2, fsdp=1, seq=1, tensor=2)
    lowered = lower_train_step(from_config_dict(config), aot.target_devices(target, chips=4))
    report = aot.compile_report("tiny train step", lowered, target)
    assert report.ok, str(report)
    assert 0 < report.peak_bytes < report.device_memory_bytes
    if target == "h100":
        # tiny_dga selects globally: importance's two kernels run too.
        assert {k.name for k in report.kernels} == GPU_KERNELS | IMPORTANCE_KERNELS, str(report)


@pytest.mark.parametrize("target", ["v5e", "h100"])
def test_kernels_compile_in_a_shard_map_that_checks_types(target):
    # jax.shard_map checks how values vary over its axes by default (check_vma): the kernels'
    # outputs must say it, else tracing failed ("manual_axis_type must not be None").
    mesh = jax.sharding.Mesh(aot.target_devices(target, chips=4)[:2], ("batch",))
    q = jax.ShapeDtypeStruct(
        (2, 1024, 4, 128), jax.numpy.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("batch"))
    )
    attention = jax.shard_map(
        lambda q, k, v: dga_attention(q, k, v, implementation=IMPLEMENTATION[target]),
        mesh=mesh,
        in_specs=(PartitionSpec("batch"),) * 3,
        out_specs=PartitionSpec("batch"),
    )

    def loss(q, k, v):
        return attention(q, k, v).astype(jax.numpy.float32).sum()

    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower()
    report = aot.compile_report("kernels in shard_map", lowered, target)
    assert report.ok, str(report)
    if target == "h100":  # global selection: importance's kernels as well as the walks'
        assert {k.name for k in report.kernels} == GPU_KERNELS | IMPORTANCE_KERNELS, str(report)
