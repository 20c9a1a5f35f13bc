"""The device a computation compiles for, and the on-chip memory its kernels may use.

The target is read from where the computation is placed, not from the host: the inputs' mesh,
else the mesh `jax.set_mesh` sets, else the default backend. So a Pallas kernel compiles for
TPU or GPU devices described by a topology (compile-only devices, `benchmarks/aot_compile.py`)
on a CPU-only host, and a real mismatch (a TPU kernel placed on CPU devices) is still an error.
"""

from __future__ import annotations

import dataclasses

import jax

_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}

# Shared memory one block may opt into, by device kind (CUDA programming guide, "technical
# specifications per compute capability"): sm_90 / sm_100 232,448 B, sm_80 166,912 B,
# sm_86 / sm_89 101,376 B, sm_75 (Turing) 65,536 B. A kind not listed gets no pre-check; its
# compiler decides. The first family a kind's name contains decides, so Turing's "Quadro RTX
# 4000" (which contains "RTX 40") and Ampere's "RTX A1000" (which contains "A100") come first.
_SHARED_MEMORY = (
    (("Quadro RTX", "TITAN RTX", "GeForce RTX 20", "Tesla T4"), 65_536),
    (("RTX A",), 101_376),
    (("H100", "H200", "H800", "H20", "GH200", "B200", "B100", "GB200"), 232_448),
    (("A100", "A800", "A30"), 166_912),
    (("L40", "L4", "A10", "A40", "A6000", "RTX 30", "RTX 40"), 101_376),
)
# Mosaic's default scoped-VMEM limit per TensorCore, by device kind, as libtpu 0.0.42 reports
# it in its out-of-memory errors (benchmarks/RESULTS.md, "compiled without hardware").
_SCOPED_VMEM = {
    "TPU v4": 16 * 2**20,
    "TPU v5 lite": 16 * 2**20,
    "TPU v5": 16 * 2**20,
    "TPU v5p": 16 * 2**20,
    "TPU v6 lite": 32 * 2**20,
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: platform ("cpu", "gpu", "tpu") and XLA's device kind."""

    platform: str
    device_kind: str

    @property
    def shared_memory_bytes(self) -> int | None:
        """Shared memory per GPU thread block (opt-in maximum); None where unknown."""
        if self.platform != "gpu":
            return None
        for kinds, size in _SHARED_MEMORY:
            if any(kind in self.device_kind for kind in kinds):
                return size
        return None

    @property
    def vmem_bytes(self) -> int | None:
        """Mosaic's default scoped VMEM per TPU kernel; None where unknown."""
        return _SCOPED_VMEM.get(self.device_kind) if self.platform == "tpu" else None


def placed_target(*arrays) -> Target:
    """Where `arrays` are placed: their mesh's devices, else the context mesh's, else the host's.

    Works on concrete arrays and on tracers inside `jax.jit` / `jax.shard_map`, including those
    traced from `jax.ShapeDtypeStruct`s with shardings (ahead-of-time compilation).
    """
    for x in arrays:
        target = _mesh_target(getattr(jax.typeof(x).sharding, "mesh", None))
        if target is None and isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            target = _device_target(next(iter(x.sharding.device_set)))
        if target is not None:
            return target
    target = _mesh_target(jax.sharding.get_abstract_mesh())
    return target if target is not None else _device_target(jax.devices()[0])


def _mesh_target(mesh) -> Target | None:
    device = getattr(mesh, "abstract_device", None)  # None on meshes built without devices
    return None if device is None else _device_target(device)


def _device_target(device) -> Target:
    return Target(_PLATFORMS.get(device.platform, device.platform), device.device_kind)
