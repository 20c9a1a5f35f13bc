"""Block sizes on the command line: `RxK`, then optionally Triton's launch, `w<warps>s<stages>`.

`128x64` is `BlockSizes(block_q=128, block_k=64)`, the rest default; `128x64w4s3` also sets
num_warps=4 and num_stages=3 (the "pallas_gpu" kernels' launch; `BlockSizes` documents both).
`attention.py` reads them after an implementation (`dga_pallas_gpu@128x64w4s3`) and
`aot_compile.py` as `--blocks`.
"""

from __future__ import annotations

import re

from dga_jax.ops.tiles import BlockSizes

_BLOCKS = re.compile(r"(\d+)x(\d+)(?:w(\d+))?(?:s(\d+))?")


def parse_blocks(text: str) -> BlockSizes | None:
    """`RxK[wW][sS]` -> BlockSizes; None if `text` is not of that form. Sizes `BlockSizes`
    refuses (0, a warp count not a power of two) raise its ValueError."""
    found = _BLOCKS.fullmatch(text)
    if found is None:
        return None
    block_q, block_k, warps, stages = (None if x is None else int(x) for x in found.groups())
    return BlockSizes(block_q=block_q, block_k=block_k, num_warps=warps, num_stages=stages)


def blocks_label(blocks: BlockSizes | None) -> str:
    """The inverse of `parse_blocks`: "128x64", "128x64w4s3"; "default" for None."""
    if blocks is None:
        return "default"
    label = f"{blocks.block_q}x{blocks.block_k}"
    if blocks.num_warps is not None:
        label += f"w{blocks.num_warps}"
    return label + ("" if blocks.num_stages is None else f"s{blocks.num_stages}")
