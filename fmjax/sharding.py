"""Logical axis names, default rules, and the device mesh.

Glossary (the only axis names models may use):
  parameters:  vocab, embed, embed_out (a second model-width axis, e.g. BERT's D x D heads), mlp,
               heads, kv_heads, head_dim, layers, table (rows of small lookup tables: learned
               positions, token types), classes, conv_in, conv_out (a conv kernel's input and output
               channels), conv_height, conv_width (its spatial size), image_channels (the few
               channels of an image a model reads or writes, e.g. 1 or 3: too few to split),
               lora_rank (the rank axis of LoRA adapters, fmjax/peft/lora.py: small, never split)
  activations: act_batch, act_seq, act_embed, act_mlp, act_heads, act_kv_heads, act_vocab
Mesh axes: data (pure data parallel), fsdp (data parallel + parameter/optimizer sharding),
tensor (tensor/model parallel).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# A handful of rules cover data, fsdp and tensor parallelism (t5x-style). A logical name absent
# from the table is replicated.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("embed_out", None),
    ("table", None),
    ("classes", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_height", None),
    ("conv_width", None),
    ("image_channels", None),
    ("lora_rank", None),
)


def rules_from_config(rules) -> tuple:
    """Config rules (list of [logical, mesh axis | list | None]) -> flax rules tuple."""
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, (list, tuple)):
            mesh_axes = tuple(mesh_axes)
        out.append((logical, mesh_axes))
    return tuple(out)


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolves `-1` (the rest of the devices) in mesh sizes; ValueError names the bad field."""
    sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
    free = [n for n, s in sizes.items() if s == -1]
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}: mesh sizes are positive integers or -1 (the rest)")
        if size > num_devices:
            raise ValueError(f"mesh.{name}={size} is more than the {num_devices} devices available; "
                             f"mesh.data*fsdp*tensor must equal {num_devices}")
    if len(free) > 1:
        raise ValueError(f"mesh: only one of mesh.data/fsdp/tensor may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {sizes} cannot fill {num_devices} devices "
                             f"({num_devices} is not divisible by {fixed})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but "
                         f"{num_devices} devices are available; set the sizes to multiply to "
                         f"{num_devices} or one of them to -1")
    return sizes


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_shardings(abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of (possibly logically boxed) abstract values.

    A box that holds no array (optax's MaskedNode: the absent optimizer state of a frozen
    parameter, see train/optim.py) is replaced by what it holds, as unboxing does, so the
    shardings have the structure of the unboxed tree.
    """
    abstract_tree = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) and not jax.tree.leaves(x.value) else x,
        abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a (batch, ...) input array: batch over the data-parallel axes."""
    spec = nn.logical_to_mesh_axes(("act_batch",), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
