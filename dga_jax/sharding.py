"""Mesh axes and the one rules object that maps logical axis names to them.

Parameters and activations are annotated with logical names (`batch`, `seq`, `embed`, ...);
`LogicalRules.spec` turns a tuple of them into a `PartitionSpec` of mesh axes and rejects a
logical name the rules do not list and a mesh axis used twice in one spec.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec

from dga_jax.errors import ConfigError
from dga_jax.ops.checks import is_int

MESH_AXES = ("data", "fsdp", "seq", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """Logical axis name -> mesh axis, axes, or None (replicated). Every logical name an array
    carries must be listed (a name that is not, e.g. a typo, is an error, not replicated).
    A name listed twice is an error too: Flax's rules take the first match, a dict the last."""

    rules: tuple[tuple[str, MeshAxes], ...]

    def __post_init__(self):
        names = []
        for rule in self.rules:
            if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(f"a logical rule is a (name, mesh axes) pair, got {rule!r}")
            axes = _flat(rule[1])
            if not all(isinstance(a, str) for a in axes) or len(set(axes)) < len(axes):
                raise ValueError(
                    f"logical rule {rule!r}: the mesh axes must be None, a name or distinct names"
                )
            names.append(rule[0])
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"logical rules name {twice} more than once: keep one rule each")

    def spec(self, logical: tuple[str | None, ...]) -> PartitionSpec:
        """The `PartitionSpec` of an array whose dimensions carry these logical names."""
        mapping, used, out = dict(self.rules), set(), []
        unknown = [name for name in logical if name is not None and name not in mapping]
        if unknown:
            raise ValueError(
                f"logical axes {logical}: {unknown} not in the rules {sorted(mapping)} "
                "(map a name to None to replicate it)"
            )
        mesh = jax.sharding.get_abstract_mesh()
        for name in logical:
            axes = mapping[name] if name is not None else None
            flat = set(_flat(axes))
            if used & flat:
                raise ValueError(f"logical axes {logical} map mesh axis {used & flat} twice")
            if not mesh.empty and not flat <= set(mesh.axis_names):
                raise ValueError(
                    f"logical axis {name!r} maps to {axes!r}, but the mesh set by jax.set_mesh "
                    f"has axes {mesh.axis_names}"
                )
            used |= flat
            out.append(axes)
        return PartitionSpec(*out)


def _flat(axes: MeshAxes) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: None -> (), "x" -> ("x",)."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


# Parameters: FSDP over `fsdp` and `seq` (ZeRO-3 over the whole context-parallel group, whose
# devices would otherwise each hold what `fsdp` leaves them), Megatron-style tensor parallelism
# over `tensor`.
# Activations: batch over (data, fsdp), sequence over `seq`, features replicated.
DEFAULT_RULES = LogicalRules(
    (
        ("batch", ("data", "fsdp")),
        ("seq", "seq"),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
        ("embed", ("fsdp", "seq")),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
        ("norm", None),
    )
)


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, seq, tensor) mesh with explicit-free (auto) axes over the first
    prod(shape) of `devices` (default `jax.devices()`); one -1 takes all the devices the other
    sizes leave (`mesh_shape`)."""
    sizes = tuple(shape)
    count = len(jax.devices() if devices is None else devices)
    sizes = (
        mesh_shape(sizes, count, "mesh shape")
        if -1 in sizes
        else _checked_sizes(sizes, "mesh shape")
    )
    return jax.make_mesh(
        sizes, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    )


def mesh_shape(
    sizes: Sequence[int], device_count: int, name: str = "mesh"
) -> tuple[int, int, int, int]:
    """(data, fsdp, seq, tensor) `sizes` with their one -1 (if any) filled so that they use all
    `device_count` devices; a `ConfigError` naming `name` (the flag or config key) otherwise."""
    sizes = list(_checked_sizes(sizes, name))
    if -1 in sizes:
        rest = -math.prod(sizes)
        if device_count % rest:
            raise ConfigError(f"{name} {sizes} does not divide {device_count} devices")
        sizes[sizes.index(-1)] = device_count // rest
    if math.prod(sizes) != device_count:
        raise ConfigError(f"{name} {sizes} needs {math.prod(sizes)} devices, have {device_count}")
    return tuple(sizes)  # type: ignore[return-value]


def _checked_sizes(sizes: Sequence[int], name: str) -> tuple[int, ...]:
    """`sizes` if they are one int >= 1 or -1 (at most one) per mesh axis; a `ConfigError`
    naming `name` otherwise (a float or bool size would fail deep in jax.make_mesh)."""
    sizes = tuple(sizes)
    if (
        len(sizes) != len(MESH_AXES)
        or sizes.count(-1) > 1
        or not all(is_int(s) and (s >= 1 or s == -1) for s in sizes)
    ):
        raise ConfigError(
            f"{name}: give {len(MESH_AXES)} sizes {MESH_AXES}, ints >= 1, at most one -1; "
            f"got {list(sizes)}"
        )
    return tuple(int(s) for s in sizes)


def explicit_axes(*trees) -> tuple[str, ...]:
    """The mesh axes of `AxisType.Explicit` (JAX's sharding in types, `jax.make_mesh`'s default
    axes) that some array in `trees` is typed as sharded over, sorted."""
    axes = set()
    for leaf in jax.tree.leaves(trees):
        sharding = (
            getattr(jax.typeof(leaf), "sharding", None) if isinstance(leaf, jax.Array) else None
        )
        if sharding is None:
            continue
        explicit = _explicit(sharding.mesh)
        for entry in sharding.spec:
            names = entry if isinstance(entry, tuple) else (entry,)
            axes.update(name for name in names if name in explicit)
    return tuple(sorted(axes))


def with_auto_axes(fn: Callable, *args):
    """fn(*args), its output shaped and sharded as args[0]: with the Explicit mesh axes the
    arguments are typed over (`explicit_axes`) turned Auto inside fn, so that its reshapes and
    loop carries (written for untyped sharding: attention's walks) leave the layout to the
    compiler; the output is typed as args[0] again. Without such axes, fn(*args) as it is."""
    axes = explicit_axes(args)
    if not axes:
        return fn(*args)
    out_sharding = jax.typeof(args[0]).sharding
    return jax.sharding.auto_axes(fn, axes=axes, out_sharding=out_sharding)(*args)


def check_auto_mesh(what: str) -> None:
    """A ValueError naming `what` if the mesh `jax.set_mesh` set has Explicit axes: the model
    places parameters and activations by logical rules (`LogicalRules`), which need Auto axes."""
    explicit = _explicit(jax.sharding.get_abstract_mesh())
    if explicit:
        raise ValueError(
            f"{what} shards by logical rules over Auto mesh axes, but the mesh set by "
            f"jax.set_mesh has Explicit axes {explicit} (jax.make_mesh's default): build it with "
            "dga_jax.make_mesh, or jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) "
            "* len(axis_names))"
        )


def _explicit(mesh) -> list[str]:
    """The names of a (concrete or abstract) mesh's Explicit axes, in mesh order."""
    kinds = zip(mesh.axis_names, mesh.axis_types, strict=True)
    return [name for name, kind in kinds if kind == jax.sharding.AxisType.Explicit]
