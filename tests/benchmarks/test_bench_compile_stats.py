"""`dga_jax.compile_stats` on what real compiles produce: XLA:GPU's optimized HLO (an H100
target's context-parallel DGA gradient) and XLA's buffer assignment (CPU here; lines of H100 and
v5e dumps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dga_jax.compile_stats import MEMORY_FIELDS, collectives, largest_buffers, xla_peak_bytes

# From the optimized HLO of an H100 compile: combined async starts, (operands, results).
_GPU_HLO = """\
  %all-gather-start.2 = ((bf16[4,15,128]{2,0,1}, bf16[4,15,128]{2,0,1}), (bf16[4,30,128]{2,0,1}, \
bf16[4,30,128]{2,0,1})) all-gather-start(%bitcast.1068.0, %bitcast.1078.0), channel_id=1, \
replica_groups={{0,1}}, dimensions={1}, use_global_device_ids=true
  %all-gather-done.2 = (bf16[4,30,128]{2,0,1}, bf16[4,30,128]{2,0,1}) all-gather-done(\
%all-gather-start.2)
  %reduce-scatter-start = ((bf16[1,4,30,128]{3,1,0,2}, bf16[1,4,30,128]{3,1,0,2}), \
(bf16[1,4,15,128]{3,1,0,2}, bf16[1,4,15,128]{3,1,0,2})) reduce-scatter-start(%bitcast.1096.0, \
%bitcast.1086.0), channel_id=1, replica_groups={{0,1}}, dimensions={2}, to_apply=%region_81.83
  %all-gather-start = (bf16[16,4,128]{2,1,0}, bf16[32,4,128]{2,1,0}) all-gather-start(\
%bitcast.44.0), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %all-to-all-start.1 = ((bf16[1,256,4,128]{3,1,0,2}), bf16[1,256,4,128]{3,1,0,2}) \
all-to-all-start(%bitcast.489.0), channel_id=1, replica_groups={{0,1}}, dimensions={2}
  %all-reduce-start = bf16[81920]{0} all-reduce-start(%bitcast.1017.0), channel_id=1
"""


class _Compiled:
    def __init__(self, text: str):
        self.text = text

    def as_text(self) -> str:
        return self.text


def test_an_async_start_counts_all_of_its_results_and_none_of_its_operands():
    found = collectives(_Compiled(_GPU_HLO))
    ops = ["all-gather", "reduce-scatter", "all-gather", "all-to-all", "all-reduce"]
    assert [c.op for c in found] == ops
    bf16 = 2
    assert [c.bytes for c in found] == [
        2 * 4 * 30 * 128 * bf16,  # both gathered arrays
        2 * 4 * 15 * 128 * bf16,  # both scattered arrays
        32 * 4 * 128 * bf16,
        256 * 4 * 128 * bf16,
        81920 * bf16,
    ]
    assert [c.elements for c in found] == [
        4 * 30 * 128,
        4 * 15 * 128,
        32 * 4 * 128,
        256 * 512,
        81920,
    ]


def test_fp8_and_complex_collectives_count_their_bytes():
    """FP8 weights gathered (as MaxText's FP8 training does): one byte an element, not a crash."""
    hlo = """\
  %all-gather = f8e4m3fn[64,128]{1,0} all-gather(%p), replica_groups={{0,1}}, dimensions={0}
  %all-gather-start = (f8e5m2[32,128]{1,0}, f8e5m2[64,128]{1,0}) all-gather-start(%q)
  %all-reduce = c64[8]{0} all-reduce(%r), to_apply=%add
"""
    found = collectives(_Compiled(hlo))
    assert [(c.op, c.elements, c.bytes) for c in found] == [
        ("all-gather", 64 * 128, 64 * 128),
        ("all-gather", 64 * 128, 64 * 128),
        ("all-reduce", 8, 8 * 8),
    ]


class _Analyzed:
    def __init__(self, analysis):
        self.analysis = analysis

    def memory_analysis(self):
        return self.analysis


class _Sizes:
    def __init__(self, **sizes):
        self.__dict__.update(sizes)


def test_peak_bytes_is_none_without_a_whole_memory_analysis():
    """JAX's memory_analysis() is None where a backend has none, and its structure is not fixed:
    a missing size is unknown, not 0 (which would understate the peak)."""
    sizes = dict(zip(MEMORY_FIELDS, (100, 20, 300, 20), strict=True))
    assert xla_peak_bytes(_Analyzed(_Sizes(**sizes))) == 100 + 20 + 300 - 20
    assert xla_peak_bytes(_Analyzed(None)) is None
    partial = {name: size for name, size in sizes.items() if name != "alias_size_in_bytes"}
    assert xla_peak_bytes(_Analyzed(_Sizes(**partial))) is None


def _sorted_product(x, w):
    return jnp.cumsum(jnp.sort(x @ w, axis=0) @ w.T, axis=1)[:, :3]


def test_largest_buffers_are_temporaries_not_parameters(tmp_path):
    """The parameter w (2 MiB) is larger than any temporary: it must not be listed."""
    x, w = jnp.ones((256, 512)), jnp.ones((512, 1024))
    lowered = jax.jit(_sorted_product).lower(x, w)
    compiled = lowered.compile(compiler_options={"xla_dump_to": str(tmp_path)})
    found = largest_buffers(tmp_path)
    assert found, "no temporaries read"
    sizes = [float(line.split(" MiB")[0]) * 2**20 for line in found]
    assert max(sizes) <= compiled.memory_analysis().temp_size_in_bytes
    assert not any(line.endswith("f32[512,1024]") for line in found), found
    assert any("f32[256,1024]" in line for line in found), found  # the sorted product


_ASSIGNMENT = """\
BufferAssignment:
allocation 0: size 65536, output shape is |bf16[1,256,2,64]|, maybe-live-out:
 value: <977 wrapped_transpose @0> (size=65536,offset=0): bf16[1,2,256,64]{3,2,1,0}
allocation 1: size 65536, parameter 1, shape |bf16[1,256,2,64]| at ShapeIndex {}:
 value: <926 k.1 @0> (size=65536,offset=0): bf16[1,256,2,64]{3,2,1,0}
allocation 4: size 4096, constant:
 value: <928 constant_530_0 @0> (size=4096,offset=0): s32[1024]{0}
allocation 63: size 280360, preallocated-temp:
 value: <56 loop_compare_fusion @0> (size=1,offset=270848): pred[]
 value: <80 loop_select_fusion{} @0> (size=16,offset=274688): (u32[1,2,4]{2,1,0}, u32[1,2,4]{2,1,0})
 value: <83 copy.23 @0> (size=32,offset=0): u32[1,2,4]{2,1,0}
 value: <84 copy.24 @0> (size=32768,offset=0): bf16[1,2,128,64]{3,2,1,0}
 value: <85 copy.25 @0> (size=32,offset=0): u32[1,2,4]{2,1,0}
allocation 318: size 6321152, color 1, preallocated-temp:
 value: <894 compare_fusion @1> (size=65536,offset=0): pred[64,1024]{1,0:T(8,128)(4,1)S(1)}
"""


def test_largest_buffers_group_the_temporaries_by_slot(tmp_path):
    """Device memory's temporaries only (not another memory space's), by offset, largest first."""
    (
        tmp_path / "module_0001.jit_f.sm_9.0a_gpu_after_optimizations-buffer-assignment.txt"
    ).write_text(_ASSIGNMENT)
    assert largest_buffers(tmp_path, count=2) == (
        "0.0 MiB: 2×u32[1,2,4], bf16[1,2,128,64]",
        "0.0 MiB: (u32[1,2,4], u32[1,2,4])",
    )
    assert len(largest_buffers(tmp_path)) == 3
