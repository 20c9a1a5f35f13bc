"""What a compile produced, read back: the collectives in its optimized HLO, XLA's peak memory
per device and largest temporaries, and each GPU kernel's shared memory, registers and spills
(`ptxas -v` on the PTX XLA dumped). `dga_jax.aot.compile_report` gathers them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import jax


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program (per device, once per occurrence in the HLO text:
    one inside a loop runs once per iteration)."""

    op: str  # all-gather, all-reduce, all-to-all, reduce-scatter, collective-permute
    elements: int  # of its largest result array
    bytes: int  # of all its result arrays
    shapes: str


_COLLECTIVE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|all-to-all|reduce-scatter|"
    r"collective-permute)(-start)?\("
)
# An array shape: dtype (f32, bf16, and FP8/FP4 types such as f8e4m3fn) and dimensions.
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+(?:e\d+m\d+[a-z\d]*)?)\[([\d,]*)\]")


def collectives(compiled: jax.stages.Compiled) -> list[Collective]:
    """The collectives in `compiled`'s optimized HLO, with their result sizes."""
    found = []
    for line in compiled.as_text().splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        results = match.group(1)
        if match.group(3) and match.group(2) != "all-reduce":
            results = _tuple_elements(results)[1]  # an async start's: (operands, results, ...)
        arrays = [
            (math.prod(int(d) for d in dims.split(",") if d), _itemsize(dtype))
            for dtype, dims in _ARRAY.findall(results)
        ]
        found.append(
            Collective(
                match.group(2),
                max(n for n, _ in arrays),
                sum(n * size for n, size in arrays),
                match.group(1),
            )
        )
    return found


def _tuple_elements(shape: str) -> list[str]:
    """ "(a, (b, c))" -> ["a", "(b, c)"]: the top-level elements of a tuple shape."""
    elements, depth, start = [], 0, 1
    for i, char in enumerate(shape[1:-1], start=1):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            elements.append(shape[start:i].strip())
            start = i + 1
    return [*elements, shape[start:-1].strip()]


def _itemsize(dtype: str) -> int:
    """Bytes per element: the bits after the type letters (f8e4m3fn: 8), sub-byte types as 1."""
    return 1 if dtype == "pred" else max(1, int(re.match(r"[a-z]+(\d+)", dtype)[1]) // 8)


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """One GPU kernel as compiled: its launch (threads per block: 32 per warp, shared memory),
    and what ptxas reports."""

    name: str
    threads: int
    shared_memory_bytes: int
    registers: int
    spill_bytes: int  # spill stores + loads
    warnings: tuple[str, ...] = ()


MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
)


def memory_sizes(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """`MEMORY_FIELDS` of `compiled.memory_analysis()`, per device; None where the backend gives
    no analysis (JAX returns None) or one without all of them (its structure is not fixed)."""
    analysis = compiled.memory_analysis()
    sizes = {name: getattr(analysis, name, None) for name in MEMORY_FIELDS}
    return None if any(size is None for size in sizes.values()) else sizes


def xla_peak_bytes(compiled: jax.stages.Compiled) -> int | None:
    """XLA's buffer-assignment peak per device: arguments + outputs + temporaries - aliased;
    None where `memory_sizes` is."""
    m = memory_sizes(compiled)
    if m is None:
        return None
    used = m["argument_size_in_bytes"] + m["output_size_in_bytes"] + m["temp_size_in_bytes"]
    return used - m["alias_size_in_bytes"]


_ALLOCATION = re.compile(r"^allocation \d+: size \d+, (.*):$")
_VALUE = re.compile(r"^ value: <[^>]*> \(size=(\d+),offset=(\d+)\): (.+)$")
_LAYOUT = re.compile(r"\{[^{}]*\}")


def largest_buffers(dump: Path, count: int = 4) -> tuple[str, ...]:
    """The `count` largest temporary buffers of device memory, from XLA's buffer assignment:
    the slots of its preallocated temporary allocation (parameters and outputs, allocations of
    their own, are in `memory_analysis()`), each with the shapes that share it, as
    "MiB: shapes", largest first."""
    found = []
    for path in dump.glob("*-buffer-assignment.txt"):
        for size, shapes in _temporary_slots(path.read_text()).values():
            counts = Counter(shapes)
            listed = ", ".join(f"{n}×{shape}" if n > 1 else shape for shape, n in counts.items())
            found.append((size, listed))
    largest = sorted(found, reverse=True)[:count]
    return tuple(f"{size / 2**20:,.1f} MiB: {shapes}" for size, shapes in largest)


def _temporary_slots(text: str) -> dict[int, tuple[int, list[str]]]:
    """offset -> (bytes, shapes of the values there) in the default memory space's
    "preallocated-temp" allocation of one buffer-assignment dump."""
    slots, in_temp = {}, False
    for line in text.splitlines():
        if header := _ALLOCATION.match(line):
            in_temp = header[1] == "preallocated-temp"  # other memory spaces add "color N"
        elif in_temp and (value := _VALUE.match(line)):
            size, shapes = slots.get(int(value[2]), (0, []))
            slots[int(value[2])] = (max(size, int(value[1])), [*shapes, _LAYOUT.sub("", value[3])])
    return slots


# The Pallas kernels' names: the walks' `interval_*`, global importance's `importance_*`.
_LAUNCH = re.compile(
    r"\b((?:interval|importance)_\w+) grid: \[[^]]*\] threads: \[([^]]*)\]\s+"
    r"shared_memory: (\d+) bytes"
)
_ENTRY = re.compile(r"\.entry (\w+)\(")


def kernel_stats(dump: Path, arch: str) -> tuple[KernelStats, ...]:
    """The Pallas kernels of one compile: threads and shared memory from XLA's thunk sequence,
    registers and spills from `ptxas -v` on the PTX XLA dumped (as XLA compiled it: same PTX,
    same arch)."""
    shared = {}
    for path in dump.glob("*thunk_sequence.txt"):
        for m in _LAUNCH.finditer(path.read_text()):
            shared[m[1]] = (math.prod(int(n) for n in m[2].split(",")), int(m[3]))
    ptx = {}
    for path in dump.glob("*.ptx"):
        for name in _ENTRY.findall(path.read_text()):
            if name in shared:
                ptx[name] = path
    missing = sorted(set(shared) - set(ptx))
    if missing:
        raise RuntimeError(f"no PTX dumped for kernels {missing}")
    return tuple(
        KernelStats(name, *launch, *_ptxas(ptx[name], arch, name))
        for name, launch in sorted(shared.items())
    )


def _ptxas(path: Path, arch: str, name: str) -> tuple[int, int, tuple[str, ...]]:
    """(registers, spill bytes, warnings) of kernel `name` in `path`, by `ptxas -v`."""
    result = subprocess.run(
        [ptxas_path(), "-v", f"-arch=sm_{arch}", str(path), "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(f"ptxas failed on {path.name}: {result.stderr.strip()[:500]}")
    # ptxas reports function by function: "Compiling entry function 'NAME'", then its lines.
    blocks = result.stderr.split("Compiling entry function '")
    text = next((b for b in blocks[1:] if b.startswith(f"{name}'")), None)
    if text is None:
        raise RuntimeError(f"ptxas reported nothing for {name} in {path.name}")
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    warnings = tuple(sorted({line.strip() for line in text.splitlines() if "warning" in line}))
    return int(registers[1]), sum(map(int, spills)), warnings


def ptxas_path() -> str:
    """`ptxas` from the `nvidia-cuda-nvcc-cu12` wheel (the one XLA uses), else from PATH."""
    try:
        import nvidia.cuda_nvcc  # noqa: PLC0415 (optional, the `aot` extra)

        bundled = Path(next(iter(nvidia.cuda_nvcc.__path__))) / "bin" / "ptxas"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if found is None:
        raise FileNotFoundError(
            "ptxas not found: install the aot extra (nvidia-cuda-nvcc-cu12) or a CUDA toolkit"
        )
    return found
