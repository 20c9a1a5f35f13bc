"""Defaults every experiment inherits; not a runnable experiment on its own.

Sections map one-to-one onto the frozen dataclasses of `train/config.py`, which reject unknown
keys and wrong types before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from dga_jax import ModelConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # The model: a preset of `dga_jax.ModelConfig` plus field overrides. Every field is there,
    # unset (None: the preset's value), so any can be set: --config.model.overrides.num_layers=4.
    config.model = ml_collections.ConfigDict(
        {"preset": "tiny", "overrides": unset_fields(ModelConfig)}
    )
    config.model.overrides.attention = "dga"
    # Init from a converted HF checkpoint (`python -m dga_jax.checkpoint.convert hf-to-orbax`).
    config.init_checkpoint = ""

    config.data = ml_collections.ConfigDict()
    config.data.train = ""  # directory or glob of SlimPajama shards; "" builds the sample corpus
    config.data.validation = ""
    config.data.tokenizer = "byte"  # "byte", or a path to tokenizer.model / tokenizer.json
    config.data.seq_len = 256
    config.data.set_names = ()  # filter on meta.redpajama_set_name; () keeps all
    config.data.add_bos = True  # wrap each document in the tokenizer's BOS / EOS ids
    config.data.add_eos = True
    config.data.num_workers = 0
    config.data.seed = 0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1
    config.mesh.fsdp = -1  # -1: all devices not used by the other axes
    config.mesh.seq = 1
    config.mesh.tensor = 1
    # How attention treats a sequence split over `seq`: "auto" (Ulysses where the KV heads allow
    # it, else "dga"), "ulysses" or "dga" (README, "Long sequences across devices").
    config.mesh.context_parallel = "auto"
    config.mesh.context_order = "contiguous"  # or "zigzag": balances causal work across `seq`

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 20
    config.optim.schedule = "cosine"  # "constant" (after warmup) or "cosine"
    config.optim.end_learning_rate_factor = 0.1
    config.optim.weight_decay = 0.1
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 1.0
    config.optim.max_nonfinite_steps = 5  # stop after this many non-finite steps in a row

    config.train = ml_collections.ConfigDict()
    config.train.steps = 200
    config.train.global_batch_size = 8
    config.train.grad_accum_steps = 1
    config.train.seed = 0
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.eval_batches = 4
    config.train.checkpoint_every = 50
    config.train.keep_checkpoints = 2
    config.train.peak_flops_per_device = 0.0  # for MFU; 0: guess from the device kind
    config.train.wandb_project = ""  # W&B logging if set and wandb is installed
    config.train.loss_chunks = 1  # > 1: the LM head on seq_len / loss_chunks tokens at a time
    config.train.profile_steps = ""  # e.g. "10,12": a jax.profiler trace into workdir/profile
    return config


def unset_fields(kind: type) -> ml_collections.ConfigDict:
    """A ConfigDict of every field of dataclass `kind` (nested ones too), each an unset typed
    placeholder: the command line may set any of them, and no other key."""
    hints = typing.get_type_hints(kind)
    fields = {}
    for field in dataclasses.fields(kind):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            fields[field.name] = unset_fields(hint)
        else:
            types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
            fields[field.name] = config_dict.placeholder(typing.get_origin(types[0]) or types[0])
    return ml_collections.ConfigDict(fields)
