"""The mesh must evenly split what the rules put on it; a config that it cannot is refused
before anything is built, naming the config keys (not an IndivisibleError from JAX)."""

from __future__ import annotations

import dataclasses
import textwrap

import jax
import pytest

from configs import tiny_dga
from dga_jax.sharding import MESH_AXES
from tests.conftest import run_on_fake_devices
from train.config import ConfigError, from_config_dict
from train.setup import check_mesh_fits


def config(**sections):
    """tiny_dga with `sections` ({"train": {"global_batch_size": 6}, ...}) changed."""
    base = tiny_dga.get_config()
    for section, values in sections.items():
        base[section].update(values)
    return from_config_dict(base)


@pytest.mark.parametrize(
    ("mesh", "changes", "match"),
    [
        (
            (2, 2, 2, 1),
            dict(train=dict(global_batch_size=6)),
            r"global_batch_size / grad_accum_steps = 6 / 1 = 6 must be a multiple of "
            r"config\.mesh\.data=2 x config\.mesh\.fsdp=2 = 4$",
        ),
        (
            (2, 2, 2, 1),
            dict(train=dict(global_batch_size=8, grad_accum_steps=4)),
            r"= 8 / 4 = 2 must be a multiple of config\.mesh\.data=2 x config\.mesh\.fsdp=2",
        ),
        (
            (1, 1, 8, 1),
            dict(data=dict(seq_len=60)),
            r"config\.data\.seq_len = 60 must be a multiple of config\.mesh\.seq=8 = 8$",
        ),
        (
            (1, 1, 8, 1),
            dict(data=dict(seq_len=72), mesh=dict(context_order="zigzag")),
            r"seq_len = 72 .* 2 x config\.mesh\.seq=8 \(config\.mesh\.context_order='zigzag'\)",
        ),
        (
            (2, 1, 1, 4),
            dict(),
            r"config\.model's num_kv_heads = 2 must be a multiple of config\.mesh\.tensor=4",
        ),
        (
            (2, 1, 4, 1),
            dict(data=dict(seq_len=64), mesh=dict(context_parallel="ulysses")),
            r"^config\.mesh\.context_parallel: context_parallel='ulysses' splits the 2 KV heads",
        ),
        (
            (1, 1, 8, 1),
            dict(data=dict(seq_len=64), train=dict(loss_chunks=16)),
            r"seq_len = 64 in 8 piece\(s\) \(config\.mesh\.seq=8\): each piece's 8 tokens "
            r"must be a multiple of config\.train\.loss_chunks=16$",
        ),
        (
            (1, 1, 1, 1),
            dict(data=dict(seq_len=60), train=dict(loss_chunks=8)),
            r"seq_len = 60 in 1 piece\(s\) \(config\.mesh\.seq=1\): .*\.loss_chunks=8$",
        ),
    ],
    ids=[
        "batch",
        "micro_batch",
        "seq_len",
        "zigzag_seq_len",
        "kv_heads",
        "ulysses_heads",
        "loss_chunks_split",
        "loss_chunks",
    ],
)
def test_sizes_the_mesh_cannot_split_name_their_keys(mesh, changes, match):
    abstract = jax.sharding.AbstractMesh(mesh, MESH_AXES)
    with pytest.raises(ConfigError, match=match):
        check_mesh_fits(config(**changes), abstract)


def test_sizes_the_mesh_splits_pass():
    changes = dict(data=dict(seq_len=64), mesh=dict(context_order="zigzag"))
    changes["train"] = dict(loss_chunks=8)  # 4 pieces of 16 tokens
    check_mesh_fits(config(**changes), jax.sharding.AbstractMesh((2, 2, 2, 1), MESH_AXES))
    ulysses = dict(data=dict(seq_len=64), mesh=dict(context_parallel="ulysses"))
    check_mesh_fits(config(**ulysses), jax.sharding.AbstractMesh((2, 2, 2, 1), MESH_AXES))


def test_zigzag_loss_chunks_need_only_divide_each_device_share():
    # seq=2 in zig-zag order: each device holds 32 of the 64 tokens, as 2 pieces of 16; the loss
    # slices the device's 32 columns, so 32 chunks fit (the step's loss is that of 1 chunk).
    mesh = jax.sharding.AbstractMesh((1, 4, 2, 1), MESH_AXES)
    zigzag = dict(data=dict(seq_len=64), mesh=dict(context_order="zigzag"))
    check_mesh_fits(config(**zigzag, train=dict(loss_chunks=32)), mesh)
    with pytest.raises(ConfigError, match=r"each piece's 32 tokens .*loss_chunks=64$"):
        check_mesh_fits(config(**zigzag, train=dict(loss_chunks=64)), mesh)


@pytest.mark.parametrize(
    ("mesh", "strategy", "match"),
    [
        (
            (1, 1, 2, 1),
            "dga",
            r"split by config\.mesh\.context_parallel='dga' runs 'blockwise' only.*"
            r"or config\.mesh\.context_parallel='ulysses'$",
        ),
        (
            (1, 1, 4, 1),
            "auto",
            r"split by config\.mesh\.context_parallel='auto' \(which resolved to 'dga'\) "
            r"runs 'blockwise' only; set "
            r"config\.model\.overrides\.attention_impl='blockwise' \(or None\)$",
        ),
    ],
)
def test_dense_over_a_dga_split_must_run_blockwise(mesh, strategy, match):
    # Dense attention under the "dga" strategy all-gathers K and V and runs "blockwise": with
    # attention_impl "xla" the train step failed while tracing, naming no config key.
    base = config(data=dict(seq_len=64), mesh=dict(context_parallel=strategy))
    dense = base.model.replace(attention="dense", attention_impl="xla")
    abstract = jax.sharding.AbstractMesh(mesh, MESH_AXES)
    head = r"^config\.model\.overrides\.attention_impl='xla': dense attention over a sequence "
    with pytest.raises(ConfigError, match=head + match):
        check_mesh_fits(dataclasses.replace(base, model=dense), abstract)
    # Blockwise (or the library's choice) splits; so does "ulysses", which keeps sequences whole.
    for impl in ("blockwise", None):
        check_mesh_fits(
            dataclasses.replace(base, model=dense.replace(attention_impl=impl)), abstract
        )
    ulysses = dataclasses.replace(base.mesh, context_parallel="ulysses")
    check_mesh_fits(
        dataclasses.replace(base, model=dense, mesh=ulysses),
        jax.sharding.AbstractMesh((1, 1, 2, 1), MESH_AXES),
    )


MAKE_SETUP = textwrap.dedent(
    """
    import pytest

    from configs import tiny_dga
    from train.config import ConfigError, from_config_dict
    from train.setup import make_setup

    base = tiny_dga.get_config()
    base.mesh.update(data=2, fsdp=2, seq=2, tensor=1)
    base.train.global_batch_size = 6
    with pytest.raises(ConfigError, match="config.train.global_batch_size"):
        make_setup(from_config_dict(base))
    print("ok")
    """
)


def test_make_setup_checks_the_mesh_first():
    run_on_fake_devices(MAKE_SETUP)


@pytest.mark.parametrize("kind", ["streaming_llm", "lm_infinite", "minference"])
def test_attention_without_context_parallelism_refuses_a_split_sequence(kind):
    base = config(data=dict(seq_len=128))  # minference is refused for training before this
    run = dataclasses.replace(base, model=base.model.replace(attention=kind))
    with pytest.raises(ConfigError, match=rf"attention='{kind}' .* config\.mesh\.seq=2 splits"):
        check_mesh_fits(run, jax.sharding.AbstractMesh((1, 2, 2, 1), MESH_AXES))
    check_mesh_fits(run, jax.sharding.AbstractMesh((2, 2, 1, 1), MESH_AXES))
