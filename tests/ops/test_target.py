"""Where a computation is placed decides which kernels it compiles, and what memory they get."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dga_jax
from dga_jax.ops.dga import pallas_gpu, pallas_tpu
from dga_jax.ops.target import Target, placed_target
from dga_jax.ops.tiles import BlockSizes

H100 = Target("gpu", "NVIDIA H100 80GB HBM3")
V5E = Target("tpu", "TPU v5 lite")
V6E = Target("tpu", "TPU v6 lite")


def _qkv(seq_len=32):
    x = jnp.zeros((1, seq_len, 2, 16), jnp.float32)
    return x, x, x


def test_placed_target_reads_arrays_context_mesh_and_tracers():
    host = Target(jax.default_backend(), jax.devices()[0].device_kind)
    q, _, _ = _qkv()
    assert placed_target(q) == host
    assert placed_target() == host
    seen = []

    def record(x):
        seen.append(placed_target(x))
        return x

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    with jax.set_mesh(mesh):
        jax.jit(record)(q)
        assert placed_target() == host
    assert seen == [host]


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_kernel_on_other_platform_names_the_placement(implementation):
    platform = implementation.removeprefix("pallas_")
    host = jax.default_backend()
    if host == platform:  # on its own hardware it runs
        assert dga_jax.dga_attention(*_qkv(), implementation=implementation).shape == (1, 32, 2, 16)
        return
    with pytest.raises(
        ValueError, match=rf"compiles for {platform.upper()} but the inputs are placed on '{host}'"
    ):
        dga_jax.dga_attention(*_qkv(), implementation=implementation)


def test_on_chip_memory_by_device_kind():
    assert H100.shared_memory_bytes == 232_448
    assert Target("gpu", "NVIDIA H200").shared_memory_bytes == 232_448
    assert Target("gpu", "NVIDIA A100-SXM4-80GB").shared_memory_bytes == 166_912
    assert Target("gpu", "NVIDIA L4").shared_memory_bytes == 101_376
    assert Target("gpu", "Some Future GPU").shared_memory_bytes is None
    assert V5E.vmem_bytes == 16 * 2**20 and V6E.vmem_bytes == 32 * 2**20
    assert V5E.shared_memory_bytes is None and H100.vmem_bytes is None
    assert Target("cpu", "cpu").vmem_bytes is None


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        ("Quadro RTX 4000", 65_536),  # Turing (sm_75), though its name contains "RTX 40"
        ("Quadro RTX 3000", 65_536),
        ("Quadro RTX 8000", 65_536),
        ("NVIDIA GeForce RTX 2080 Ti", 65_536),
        ("NVIDIA RTX 4000 Ada Generation", 101_376),  # Ada (sm_89)
        ("NVIDIA RTX 2000 Ada Generation", None),  # Ada, not listed: not Turing's "RTX 20"
        ("NVIDIA RTX A1000", 101_376),  # Ampere sm_86, though its name contains "A100"
        ("NVIDIA RTX A3000 Laptop GPU", 101_376),  # sm_86, though its name contains "A30"
    ],
)
def test_shared_memory_of_cards_whose_names_contain_another_family(kind, size):
    assert Target("gpu", kind).shared_memory_bytes == size


def test_gpu_tiles_that_cannot_fit_shared_memory_are_rejected():
    shape = (1, 4096, 4, 128)
    pallas_gpu.check_fits(pallas_gpu.DEFAULT_BLOCKS, shape, jnp.dtype(jnp.bfloat16), H100)
    pallas_gpu.check_fits(BlockSizes(128, 128), shape, jnp.dtype(jnp.bfloat16), H100)
    with pytest.raises(ValueError, match=r"262,144 bytes of shared memory.*has 232,448"):
        pallas_gpu.check_fits(BlockSizes(256, 256), shape, jnp.dtype(jnp.bfloat16), H100)
    # float32 doubles the tiles: 128/128 fits an H100 in bfloat16, not in float32.
    with pytest.raises(ValueError, match="shared memory"):
        pallas_gpu.check_fits(BlockSizes(128, 128), shape, jnp.dtype(jnp.float32), H100)
    # The query block is clamped to the sequence, as the kernels clamp it.
    pallas_gpu.check_fits(BlockSizes(512, 64), (1, 64, 4, 128), jnp.dtype(jnp.bfloat16), H100)
    unknown = Target("gpu", "Some Future GPU")
    pallas_gpu.check_fits(BlockSizes(1024, 1024), shape, jnp.dtype(jnp.bfloat16), unknown)


@pytest.mark.parametrize(
    ("target", "dtype", "head_dim", "blocks"),
    [
        (H100, jnp.bfloat16, 128, (128, 64)),  # measured fastest on an H100
        (H100, jnp.float16, 96, (128, 64)),  # padded to 128
        (H100, jnp.bfloat16, 64, (64, 64)),  # 4 warps: 128 x 64 spills in dK'/dV'
        (H100, jnp.bfloat16, 32, (64, 64)),
        (H100, jnp.float32, 128, (64, 64)),  # 128 rows overflow shared memory in float32
        (H100, jnp.bfloat16, 256, (64, 64)),  # and for D above 128
        (Target("gpu", "NVIDIA H200"), jnp.bfloat16, 128, (128, 64)),
        # Less shared memory than 128 x 64's kernels took on an H100 (181,248 B), or unknown.
        (Target("gpu", "NVIDIA A100-SXM4-80GB"), jnp.bfloat16, 128, (64, 64)),
        (Target("gpu", "NVIDIA L4"), jnp.bfloat16, 128, (64, 64)),
        (Target("gpu", "Some Future GPU"), jnp.bfloat16, 128, (64, 64)),
        (Target("cpu", "cpu"), jnp.bfloat16, 128, (128, 64)),  # interpret mode: the H100's
    ],
)
def test_gpu_default_tiles_follow_dtype_head_dim_and_shared_memory(target, dtype, head_dim, blocks):
    shape, dtype = (1, 4096, 4, head_dim), jnp.dtype(dtype)
    chosen = pallas_gpu.default_blocks(shape, dtype, target)
    assert (chosen.block_q, chosen.block_k) == blocks
    pallas_gpu.check_fits(chosen, shape, dtype, target)  # the default always fits


@pytest.mark.parametrize(
    ("platform", "dtype", "head_dim", "picked"),
    [("gpu", "bfloat16", 128, "pallas_gpu"), ("gpu", "float16", 256, "pallas_gpu")]
    + [("gpu", "float32", 128, "xla"), ("tpu", "bfloat16", 128, "xla")]
    + [("cpu", "bfloat16", 128, "xla")]
    # D = 512: even 64 x 64 tiles overflow an H100's shared memory, so "xla", never an error.
    + [("gpu", "bfloat16", 512, "xla")],
)
def test_implementation_none_picks_the_triton_kernels_for_16_bit_inputs_on_gpus(
    monkeypatch, platform, dtype, head_dim, picked
):
    from dga_jax.ops.dga import backends

    target = {"gpu": H100, "tpu": V5E, "cpu": Target("cpu", "cpu")}[platform]
    monkeypatch.setattr(backends, "placed_target", lambda *arrays: target)
    q = jnp.zeros((1, 256, 2, head_dim), dtype)
    assert backends.default_for(q, q, q) == picked
    implementation, blocks = backends.check_implementation(None, None, False, q, q, q)
    assert implementation == picked
    if picked == "pallas_gpu":
        assert blocks == pallas_gpu.default_blocks(q.shape, q.dtype, H100)


def test_tpu_tiles_that_cannot_fit_vmem_are_rejected():
    shape, bf16 = (1, 8192, 4, 128), jnp.dtype(jnp.bfloat16)
    pallas_tpu.check_fits(pallas_tpu.DEFAULT_BLOCKS, shape, bf16, V5E)
    with pytest.raises(ValueError, match=r"27.1 MiB of VMEM; TPU v5 lite kernels get 16 MiB"):
        pallas_tpu.check_fits(BlockSizes(2048, 2048), shape, bf16, V5E)
    pallas_tpu.check_fits(BlockSizes(2048, 2048), shape, bf16, V6E)  # v6e's limit is 32 MiB
    # Every buffer and the score tile grow with the blocks: the floor is monotone in them.
    floors = [pallas_tpu.vmem_floor(b, b, 128, 2) for b in (128, 256, 512, 1024, 2048)]
    assert floors == sorted(floors) and floors[0] > 0


def test_without_pallas_triton_the_default_is_xla_and_the_gpu_kernels_are_refused(monkeypatch):
    """JAX deprecated Pallas' Triton backend in 0.11 and will remove it: a JAX without it
    leaves "pallas_gpu" to be refused by name, and implementation=None on a GPU runs "xla"."""
    from dga_jax.ops.dga import backends, pallas_gpu_forward

    monkeypatch.setattr(pallas_gpu_forward, "pltriton", None)
    monkeypatch.setattr(backends, "placed_target", lambda *arrays: H100)
    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    assert backends.default_for(q, q, q) == "xla"
    for call in (
        lambda: backends.check_implementation("pallas_gpu", None, False, q, q, q),
        lambda: backends.importance_implementation("pallas_gpu"),
    ):
        with pytest.raises(ValueError, match=r"Triton backend .*use implementation='xla'"):
            call()


NO_TRITON_SCRIPT = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # as a JAX that has removed it
import jax, jax.numpy as jnp
import dga_jax
q = jnp.ones((1, 64, 2, 16), jnp.bfloat16)
out = dga_jax.dga_attention(q, q, q, group_size=4, focal_ratio=0.25)
assert out.shape == q.shape
try:
    dga_jax.dga_attention(q, q, q, group_size=4, implementation="pallas_gpu", interpret=True)
except ValueError as error:
    assert "Triton backend" in str(error), error
else:
    raise AssertionError("pallas_gpu ran without Pallas' Triton backend")
print("no triton ok")
"""


def test_dga_jax_imports_and_runs_without_pallas_triton():
    result = subprocess.run(
        [sys.executable, "-c", NO_TRITON_SCRIPT],
        cwd=Path(__file__).parents[2],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "no triton ok" in result.stdout, result.stderr[-3000:]
