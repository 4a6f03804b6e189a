"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a pure transform of the parameter tree.

A targeted kernel W keeps its multi-axis shape and gets two adapters at the same path, A and B;
the model then runs with W + (alpha / rank) * A @ B, contracted over the rank axis and batched
over leading layer axes. B starts at zero, so the initial merged model is the base model. The
trainer sees one parameter tree {"base": frozen model params, "lora": adapters} through
`LoraTask`, which marks the base frozen (no updates, no optimizer state) and merges inside the
loss; `merge` is also the export (mode=export writes the merged tree in the plain model's layout).

Which axes of W are its input and which its output comes from its logical axis names: leading
"layers" axes are batch axes; the output is the last unit, where a unit is one axis or a
heads / kv_heads axis with the head_dim axis after it; every other axis is input. So the query
kernel embed x heads x head_dim has input embed and output heads x head_dim, the attention out
kernel heads x head_dim x embed has input heads x head_dim, and a conv kernel
height x width x conv_in x conv_out gets a conv A and a 1x1 B (as peft's conv LoRA).

Dropout: a parameter-tree transform cannot draw per-token masks on activations. With
`dropout > 0`, each training step (and microbatch) zeroes every input row of A (one input
feature of the adapter, per layer) with probability `dropout` and scales the kept rows by
1 / (1 - dropout): dropout on the adapter's input x (x @ diag(mask) @ A) with one mask shared by
all tokens of the step, instead of one per token. The base path never sees dropout, and eval,
samples and export use no dropout.

Shapes: W is *lead x *in x *out, A is *lead x *in x R, B is *lead x R x *out, with R the rank.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from fmjax.train import state as state_lib

RANK_AXIS = "lora_rank"  # the logical name of the rank axis (fmjax/sharding.py: never split)
_HEAD_AXES = ("heads", "kv_heads")
_DROPOUT_SALT = 0x4C6F5241  # folded into the step's key: dropout masks independent of the task's own
# Optional task hooks that take the parameters first (fmjax/tasks/__init__.py, sft.py): a LoraTask
# has them where its inner task has them, called with the merged parameters.
_MERGED_HOOKS = ("sample_scores", "decoder_params")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int  # 0: LoRA off
    alpha: float  # adapters are scaled by alpha / rank
    dropout: float  # rate of dropping input rows of A per step (module docstring)
    targets: tuple[str, ...]  # regular expressions, re.search-ed in "/"-joined parameter paths

    @classmethod
    def from_config(cls, config) -> "LoraConfig":
        """The validated `config.optim.lora`; ValueError naming the field at fault."""
        c = config.optim.lora
        lora = cls(int(c.rank), float(c.alpha), float(c.dropout), tuple(c.targets))
        lora.validate()
        return lora

    def validate(self):
        if self.rank < 0:
            raise ValueError(f"optim.lora.rank={self.rank} must be >= 0 (0: LoRA off)")
        if not self.alpha > 0:
            raise ValueError(f"optim.lora.alpha={self.alpha} must be > 0 (adapters are scaled by "
                             "alpha / rank)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"optim.lora.dropout={self.dropout} must be in [0, 1)")
        if self.rank > 0 and not self.targets:
            raise ValueError("optim.lora.targets is empty; give regular expressions of the parameter "
                             "paths to adapt, e.g. ('attn/(query|value)/kernel',)")
        for i, pattern in enumerate(self.targets):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"optim.lora.targets[{i}]={pattern!r} is not a regular expression "
                                 f"({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def kernel_split(names) -> tuple[int, int] | None:
    """(number of leading layer axes, number of input axes) of a parameter with these logical axis
    names; None when it has no input axis besides its output unit (a norm scale, a bias)."""
    n_lead = 0
    while n_lead < len(names) and names[n_lead] == "layers":
        n_lead += 1
    rest = names[n_lead:]
    n_out = 2 if len(rest) >= 2 and rest[-2] in _HEAD_AXES and rest[-1] == "head_dim" else 1
    n_in = len(rest) - n_out
    return (n_lead, n_in) if n_in >= 1 else None


def select_targets(boxed_params, cfg: LoraConfig) -> dict[tuple[str, ...], tuple[int, int]]:
    """{path: kernel_split} of every parameter a target pattern matches. ValueError naming the
    pattern if one matches nothing, or matches a parameter that is not a matrix."""
    patterns = [re.compile(p) for p in cfg.targets]
    flat = traverse_util.flatten_dict(boxed_params)
    used, targets = [False] * len(patterns), {}
    for path, leaf in flat.items():
        name = "/".join(map(str, path))
        hits = [i for i, p in enumerate(patterns) if p.search(name)]
        if not hits:
            continue
        field = f"optim.lora.targets[{hits[0]}]={cfg.targets[hits[0]]!r}"
        names = getattr(leaf, "names", None)
        if names is None:
            raise ValueError(f"{field} matches {name}, which has no logical axis names to tell its input "
                             "from its output axes")
        split = kernel_split(names)
        if split is None:
            raise ValueError(f"{field} matches {name} (axes {tuple(names)}), which is not a matrix; "
                             "make the pattern more specific, e.g. end it with /kernel")
        targets[path] = split
        for i in hits:
            used[i] = True
    for i, ok in enumerate(used):
        if not ok:
            matrices = [k for k, v in flat.items() if kernel_split(getattr(v, "names", ())) is not None]
            examples = ", ".join("/".join(map(str, k)) for k in matrices[:6])
            raise ValueError(f"optim.lora.targets[{i}]={cfg.targets[i]!r} matches no parameter of the model; "
                             f"its matrices are e.g. {examples}")
    return targets


def _pair(box, n_lead: int, n_in: int, uniform_a, rank: int):
    """(A, B) of a kernel, boxed with logical names: A Kaiming-uniform as in peft (bound
    1/sqrt(fan_in), from `uniform_a`, U(-1, 1) of A's shape), B zeros."""
    shape, names, dtype = box.value.shape, tuple(box.names), box.value.dtype
    cut = n_lead + n_in
    a = (uniform_a / math.sqrt(math.prod(shape[n_lead:cut]))).astype(dtype)
    b = jnp.zeros(shape[:n_lead] + (rank,) + shape[cut:], dtype)
    return (nn.LogicallyPartitioned(a, names[:cut] + (RANK_AXIS,)),
            nn.LogicallyPartitioned(b, names[:n_lead] + (RANK_AXIS,) + names[cut:]))


def init_adapters(rng, boxed_params, cfg: LoraConfig) -> dict:
    """Boxed adapters {..path..: {"a": A, "b": B}} for every target of `cfg` in the boxed params.

    Every A comes from one uniform draw: one random-bits computation to compile, not one per kernel.
    """
    flat = traverse_util.flatten_dict(boxed_params)
    targets = sorted(select_targets(boxed_params, cfg).items())
    a_shapes = [flat[path].value.shape[:n_lead + n_in] + (cfg.rank,) for path, (n_lead, n_in) in targets]
    sizes = [math.prod(shape) for shape in a_shapes]
    uniform = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    adapters, start = {}, 0
    for (path, (n_lead, n_in)), shape, size in zip(targets, a_shapes, sizes):
        a, b = _pair(flat[path], n_lead, n_in, uniform[start:start + size].reshape(shape), cfg.rank)
        adapters[path + ("a",)], adapters[path + ("b",)] = a, b
        start += size
    return traverse_util.unflatten_dict(adapters)


def delta(a, b, kernel_ndim: int):
    """A @ B over the rank axis, batched over leading axes: the kernel-shaped low-rank update."""
    n_lead = a.ndim + b.ndim - 2 - kernel_ndim
    n_in = a.ndim - 1 - n_lead
    letters = string.ascii_letters[:kernel_ndim + 1]
    lead, ins, outs, r = (letters[:n_lead], letters[n_lead:n_lead + n_in],
                          letters[n_lead + n_in:kernel_ndim], letters[kernel_ndim])
    return jnp.einsum(f"{lead}{ins}{r},{lead}{r}{outs}->{lead}{ins}{outs}", a, b,
                      precision=jax.lax.Precision.HIGHEST)


def drop_rows(rng, a, rate: float):
    """A with each input row (one per position of all axes but the rank) zeroed with probability
    `rate` and the kept ones scaled by 1 / (1 - rate)."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, a.shape[:-1])
    return jnp.where(keep[..., None], a / (1.0 - rate), jnp.zeros_like(a))


def merge(base, adapters, cfg: LoraConfig, dropout_rng=None):
    """The base tree with W + (alpha / rank) * A @ B at every adapted path (same structure as base).

    With `dropout_rng` and cfg.dropout > 0, A's input rows are dropped first (module docstring).
    Pure and jittable.
    """
    flat = traverse_util.flatten_dict(base)
    pairs = {}
    for path, leaf in traverse_util.flatten_dict(adapters).items():
        pairs.setdefault(path[:-1], {})[path[-1]] = leaf
    for i, (path, pair) in enumerate(sorted(pairs.items())):
        a, w = pair["a"], flat[path]
        if dropout_rng is not None and cfg.dropout > 0:
            a = drop_rows(jax.random.fold_in(dropout_rng, i), a, cfg.dropout)
        flat[path] = w + (cfg.scale * delta(a, pair["b"], w.ndim)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


class LoraTask:
    """A task trained through LoRA adapters: params {"base": the inner task's (frozen), "lora": adapters}.

    Every attribute it does not define (model, unit, tokenizer, abstract_batch, eval_results,
    train_iterator, ...) is the inner task's; eval_sums, write_samples, sample_scores and
    decoder_params see the merged parameters (no dropout). The trainer, checkpoints, EMA, microbatches and
    sharding see an ordinary parameter tree; `trainable` freezes the base and `pretrained_slots`
    sends config.init_from's parameters to it.
    """

    pretrained_slots = ("base",)

    def __init__(self, inner, cfg: LoraConfig):
        for hook in ("pretrained_slots", "trainable"):
            if hasattr(inner, hook):
                raise ValueError(f"optim.lora.rank={cfg.rank}: task {type(inner).__name__} already has "
                                 f"`{hook}` (several models or frozen parts); LoRA wraps single-model tasks")
        self.inner, self.lora = inner, cfg
        self._merged = jax.jit(self.export_params)
        for hook in _MERGED_HOOKS:  # optional hooks of the inner task see the merged parameters
            if hasattr(inner, hook):
                setattr(self, hook, functools.partial(self._on_merged, getattr(inner, hook)))

    def __getattr__(self, name):
        if name.startswith("__") or name in ("inner", "lora"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _on_merged(self, fn, params, *args, **kwargs):
        return fn(self._merged(params), *args, **kwargs)

    def init_params(self, rng, batch):
        base = state_lib.init_params(self.inner, rng, batch)
        if not isinstance(base, Mapping):
            raise ValueError(f"optim.lora.rank={self.lora.rank}: task {type(self.inner).__name__} has "
                             f"parameters of type {type(base).__name__}, not a dict of named parameters; "
                             "LoRA cannot target them (set optim.lora.rank=0)")
        return {"base": base, "lora": init_adapters(jax.random.fold_in(rng, 1), base, self.lora)}

    def trainable(self, params):
        return {"base": jax.tree.map(lambda _: False, params["base"]),
                "lora": jax.tree.map(lambda _: True, params["lora"])}

    def export_params(self, params):
        """The merged parameters, in the inner task's layout (what mode=export writes)."""
        return merge(params["base"], params["lora"], self.lora)

    def loss(self, params, batch, rng):
        base = jax.lax.stop_gradient(params["base"])
        dropout_rng = jax.random.fold_in(rng, _DROPOUT_SALT) if self.lora.dropout > 0 else None
        return self.inner.loss(merge(base, params["lora"], self.lora, dropout_rng), batch, rng)

    def eval_sums(self, params, batch):
        return self.inner.eval_sums(self.export_params(params), batch)

    def write_samples(self, params, workdir, step):
        return self.inner.write_samples(self._merged(params), workdir, step)
