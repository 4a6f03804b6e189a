"""UNet: a small DDPM / Imagen-style denoiser (pure flax.linen), optionally class- or text-conditioned.

A 3x3 input conv, then per resolution level ResNet blocks (GroupNorm, SiLU, 3x3 conv; the time and
class embedding enter as a per-channel scale and shift) and a strided-conv downsampling; a middle
of ResNet, attention, ResNet; an up path that concatenates the down path's activations and
upsamples by nearest neighbour + conv. Attention blocks (at `attention_levels` and always in the
middle) self-attend over the H*W positions and, with text, cross-attend to the context. The last
conv of each residual branch, each attention output and the output conv start at zero, so every
block starts as the identity and the untrained net predicts zero.

Classifier-free guidance: class index `n_classes` and an all-padding context row are the "null"
condition; a task drops conditions to them during training and mixes both predictions when sampling.
Shapes: B batch, H height, W width, C channels, F a ResNet block's output channels, G norm groups,
M channels per group, T time-embedding width (4 * config.width), K time frequencies, P = H*W
positions, L context length, D context width, S attended keys, N heads, E head dim.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.decoder import DTYPES, REMAT_POLICIES, ModelConfig
from fmjax.models.encoder import Encoder, EncoderConfig
from fmjax.nn.dense import dense
from fmjax.nn.norm import LayerNorm

TIME_SCALE = 1000.0  # t in [0, 1] -> DDPM's step range, so the sinusoid frequencies cover it well


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
    image_size: int  # square images, H = W
    channels: int  # image channels: 1 (MNIST, digits) or 3
    width: int  # channels at level 0; level i has width * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2)  # one entry per resolution level
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (1,)  # levels with attention blocks (the middle always has one)
    n_heads: int = 4
    groups: int = 8  # GroupNorm groups
    dropout: float = 0.0  # inside ResNet blocks, training only
    n_classes: int = 0  # 0: no class conditioning; else labels in [0, n_classes], n_classes = null
    text_width: int = 0  # 0: no cross-attention; else D of the context vectors
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"  # per block: none | full | save_dots

    def __post_init__(self):
        # Config files may give lists; a frozen (hashable) config needs tuples.
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    def checks(self):
        levels = max(self.levels, 1)
        factor = 2 ** (levels - 1)
        mults_ok = self.levels > 0 and all(m > 0 for m in self.channel_mults)
        level_widths = [self.width * m for m in self.channel_mults] if mults_ok else []
        # The middle block attends at the last level whatever attention_levels says.
        attended = sorted({*self.attention_levels, levels - 1})
        attended_widths = [level_widths[i] for i in attended if 0 <= i < len(level_widths)]
        return [
            (mults_ok, f"model.channel_mults={self.channel_mults} must be a non-empty tuple of positive "
                       "ints"),
            (self.image_size > 0 and self.image_size % factor == 0,
             f"model.image_size={self.image_size} must be a positive multiple of {factor} "
             f"(2**(levels-1), levels = len(model.channel_mults) = {self.levels})"),
            (self.channels > 0, f"model.channels={self.channels} must be positive"),
            (self.width > 0 and self.width % 2 == 0,
             f"model.width={self.width} must be positive and even (sinusoidal time features)"),
            (self.blocks_per_level > 0, f"model.blocks_per_level={self.blocks_per_level} must be positive"),
            (self.groups > 0 and all(c % self.groups == 0 for c in level_widths),
             f"model.width * model.channel_mults = {level_widths} must all be divisible by "
             f"model.groups={self.groups}"),
            (all(0 <= i < self.levels for i in self.attention_levels),
             f"model.attention_levels={self.attention_levels}: levels are 0..{self.levels - 1}"),
            (self.n_heads > 0 and all(c % self.n_heads == 0 for c in attended_widths),
             f"model.n_heads={self.n_heads} must divide the channels of every attended level "
             f"({attended_widths})"),
            (0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)"),
            (self.n_classes >= 0, f"model.n_classes={self.n_classes} must be >= 0 (0: unconditional)"),
            (self.text_width >= 0, f"model.text_width={self.text_width} must be >= 0 (0: no text)"),
        ]


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, zero: bool = False,
         axes: tuple[str, str] = ("conv_in", "conv_out")) -> nn.Conv:
    """A k x k conv, "SAME" padded; `axes` names its input and output channels."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    init = nn.initializers.zeros if zero else init
    return nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME", dtype=dtype,
                   param_dtype=jnp.float32,
                   kernel_init=nn.with_logical_partitioning(init, ("conv_height", "conv_width", *axes)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)), name=name)


def constrain(x_BxHxWxC):
    return nn.with_logical_constraint(x_BxHxWxC, ("act_batch", None, None, "act_embed"))


def timestep_embedding(t_B, dim: int, max_period: float = 10_000.0):
    """Sinusoidal features B x dim of continuous time t in [0, 1] (as DDPM's, of t * 1000)."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BxK = (t_B.astype(jnp.float32) * TIME_SCALE)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args_BxK), jnp.sin(args_BxK)], axis=-1)


class GroupNorm(nn.Module):
    """GroupNorm over H, W and each group of C/G channels, statistics in float32."""
    groups: int
    dtype: jnp.dtype = jnp.float32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BxHxWxC):
        b, h, w, c = x_BxHxWxC.shape
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)), (c,),
                           jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (c,),
                          jnp.float32)
        x_BxHxWxGxM = x_BxHxWxC.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(x_BxHxWxGxM, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x_BxHxWxGxM - mean), axis=(1, 2, 4), keepdims=True)
        normed_BxHxWxC = ((x_BxHxWxGxM - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (normed_BxHxWxC * scale.reshape(1, 1, 1, c) + bias.reshape(1, 1, 1, c)).astype(self.dtype)


class ResBlock(nn.Module):
    config: UNetConfig
    features: int
    deterministic: bool = True  # False: dropout on (training)

    @nn.compact
    def __call__(self, x_BxHxWxC, emb_BxT):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        f = self.features
        h_BxHxWxF = conv(f, 3, dtype, "conv1")(nn.silu(GroupNorm(cfg.groups, dtype, name="norm1")(x_BxHxWxC)))
        # Scale-shift conditioning (improved DDPM / ADM): a multiplicative path lets t and the class
        # gate channels, not only move them.
        emb_BxT = nn.silu(emb_BxT)
        scale_BxF = dense(f, ("embed", "conv_out"), dtype, "emb_scale", use_bias=True)(emb_BxT)
        shift_BxF = dense(f, ("embed", "conv_out"), dtype, "emb_shift", use_bias=True)(emb_BxT)
        h_BxHxWxF = GroupNorm(cfg.groups, dtype, name="norm2")(h_BxHxWxF)
        h_BxHxWxF = h_BxHxWxF * (1 + scale_BxF[:, None, None, :]) + shift_BxF[:, None, None, :]
        h_BxHxWxF = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(nn.silu(h_BxHxWxF))
        h_BxHxWxF = conv(f, 3, dtype, "conv2", zero=True)(h_BxHxWxF)
        if x_BxHxWxC.shape[-1] != f:
            x_BxHxWxC = conv(f, 1, dtype, "skip")(x_BxHxWxC)
        return constrain(x_BxHxWxC.astype(dtype) + h_BxHxWxF)


class OutProjection(nn.Module):
    """Heads x head_dim -> C, zero-initialised so that a new attention branch adds nothing."""
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxPxNxE):
        n, e = x_BxPxNxE.shape[-2:]
        init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim", "embed"))
        kernel = self.param("kernel", init, (n, e, self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (self.features,), jnp.float32)
        y_BxPxC = jnp.einsum("bpne,nec->bpc", x_BxPxNxE.astype(self.dtype), kernel.astype(self.dtype))
        return y_BxPxC + bias.astype(self.dtype)[None, None, :]


class MultiHeadAttention(nn.Module):
    """Queries from x, keys/values from `kv` (x itself for self-attention); mask: True = may attend.

    With `null_kv`, a learned key/value pair is always attended in addition to `kv`: a row whose
    mask is all False (the null caption) then attends to it alone, so its output is finite and
    independent of the padded values, and the model learns what "no text" means.
    """
    n_heads: int
    dtype: jnp.dtype = jnp.float32
    null_kv: bool = False

    @nn.compact
    def __call__(self, x_BxPxC, kv_BxSxD, mask_BxS=None):
        b, c = x_BxPxC.shape[0], x_BxPxC.shape[-1]
        n, e = self.n_heads, c // self.n_heads
        axes = ("embed", "heads", "head_dim")
        q_BxPxNxE = dense((n, e), axes, self.dtype, "query", use_bias=True)(x_BxPxC)
        k_BxSxNxE = dense((n, e), axes, self.dtype, "key", use_bias=True)(kv_BxSxD)
        v_BxSxNxE = dense((n, e), axes, self.dtype, "value", use_bias=True)(kv_BxSxD)
        if self.null_kv:
            init = nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("heads", "head_dim"))
            null_k, null_v = (jnp.broadcast_to(self.param(name, init, (n, e), jnp.float32).astype(self.dtype),
                                               (b, 1, n, e)) for name in ("null_key", "null_value"))
            k_BxSxNxE = jnp.concatenate([null_k, k_BxSxNxE], axis=1)
            v_BxSxNxE = jnp.concatenate([null_v, v_BxSxNxE], axis=1)
            if mask_BxS is not None:
                mask_BxS = jnp.concatenate([jnp.ones((b, 1), bool), mask_BxS], axis=1)
        q_BxPxNxE = nn.with_logical_constraint(q_BxPxNxE, ("act_batch", "act_seq", "act_heads", None))
        k_BxSxNxE = nn.with_logical_constraint(k_BxSxNxE, ("act_batch", "act_seq", "act_heads", None))
        v_BxSxNxE = nn.with_logical_constraint(v_BxSxNxE, ("act_batch", "act_seq", "act_heads", None))
        mask = None if mask_BxS is None else mask_BxS[:, None, None, :]  # B x 1 x 1 x S
        out_BxPxNxE = jax.nn.dot_product_attention(q_BxPxNxE, k_BxSxNxE, v_BxSxNxE, mask=mask,
                                                   implementation="xla")
        return OutProjection(c, self.dtype, name="out")(out_BxPxNxE)


class AttentionBlock(nn.Module):
    """x + self-attention over the H*W positions, then (with a context) + cross-attention to it."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, context_BxLxD=None, context_mask_BxL=None):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        b, h, w, c = x_BxHxWxC.shape
        x_BxHxWxC = x_BxHxWxC.astype(dtype)
        y_BxPxC = GroupNorm(cfg.groups, dtype, name="norm")(x_BxHxWxC).reshape(b, h * w, c)
        y_BxPxC = MultiHeadAttention(cfg.n_heads, dtype, name="self_attn")(y_BxPxC, y_BxPxC)
        x_BxHxWxC = x_BxHxWxC + y_BxPxC.reshape(b, h, w, c)
        if context_BxLxD is not None:
            y_BxPxC = GroupNorm(cfg.groups, dtype, name="cross_norm")(x_BxHxWxC).reshape(b, h * w, c)
            y_BxPxC = MultiHeadAttention(cfg.n_heads, dtype, null_kv=True, name="cross_attn")(
                y_BxPxC, context_BxLxD, context_mask_BxL)
            x_BxHxWxC = x_BxHxWxC + y_BxPxC.reshape(b, h, w, c)
        return constrain(x_BxHxWxC)


def upsample(x_BxHxWxC):
    return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


class UNet(nn.Module):
    """Noisy images and times -> float32 predictions of the same shape (noise, x0 or v: the task decides)."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, t_B, labels_B=None, context_BxLxD=None, context_mask_BxL=None,
                 deterministic: bool = True):
        """t_B: float time in [0, 1]. labels_B: int classes, n_classes = null; None = all null.

        context_BxLxD: text vectors, context_mask_BxL 1 = real token, 0 = padding (default all
        real); context None = the null caption for every row.
        """
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        batch = x_BxHxWxC.shape[0]
        t_width = 4 * cfg.width
        emb_BxT = timestep_embedding(t_B, cfg.width)
        emb_BxT = dense(t_width, ("embed", "mlp"), dtype, "time_in", use_bias=True)(emb_BxT)
        emb_BxT = dense(t_width, ("mlp", "embed"), dtype, "time_out", use_bias=True)(nn.silu(emb_BxT))
        if cfg.n_classes:
            if labels_B is None:
                labels_B = jnp.full((batch,), cfg.n_classes, jnp.int32)
            init = nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("classes", "embed"))
            emb_BxT = emb_BxT + nn.Embed(cfg.n_classes + 1, t_width, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=init, name="class_embed")(labels_B)
        elif labels_B is not None:
            raise ValueError("UNet got labels but model.n_classes=0; set model.n_classes to use them")

        if cfg.text_width:
            if context_BxLxD is None:
                context_BxLxD = jnp.zeros((batch, 1, cfg.text_width), dtype)
                context_mask_BxL = jnp.zeros((batch, 1), bool)
            elif context_mask_BxL is None:
                context_mask_BxL = jnp.ones(context_BxLxD.shape[:2], bool)
            # Text encoders end in differently scaled states; one LayerNorm puts them on one scale.
            context_BxLxD = LayerNorm(1e-5, dtype, name="context_norm")(context_BxLxD)
            context_mask_BxL = context_mask_BxL > 0
        elif context_BxLxD is not None:
            raise ValueError("UNet got a context but model.text_width=0; set it to the context width")

        res_block, attn_block = ResBlock, AttentionBlock
        if cfg.remat != "none":
            res_block = nn.remat(ResBlock, policy=REMAT_POLICIES[cfg.remat])
            attn_block = nn.remat(AttentionBlock, policy=REMAT_POLICIES[cfg.remat])

        def attend(h, name):
            return attn_block(cfg, name=name)(h, context_BxLxD, context_mask_BxL)

        h = conv(cfg.width, 3, dtype, "conv_in", axes=("image_channels", "conv_out"))(x_BxHxWxC)
        skips = [h]
        for level, mult in enumerate(cfg.channel_mults):
            for i in range(cfg.blocks_per_level):
                h = res_block(cfg, cfg.width * mult, deterministic,
                              name=f"down_{level}_block_{i}")(h, emb_BxT)
                if level in cfg.attention_levels:
                    h = attend(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level < cfg.levels - 1:
                h = constrain(conv(h.shape[-1], 3, dtype, f"down_{level}_downsample", stride=2)(h))
                skips.append(h)

        mid = cfg.width * cfg.channel_mults[-1]
        h = res_block(cfg, mid, deterministic, name="mid_block_0")(h, emb_BxT)
        h = attend(h, "mid_attn")
        h = res_block(cfg, mid, deterministic, name="mid_block_1")(h, emb_BxT)

        for level in reversed(range(cfg.levels)):
            # One block more than on the way down: it takes the skip from the level's entry.
            for i in range(cfg.blocks_per_level + 1):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
                h = res_block(cfg, cfg.width * cfg.channel_mults[level], deterministic,
                              name=f"up_{level}_block_{i}")(h, emb_BxT)
                if level in cfg.attention_levels:
                    h = attend(h, f"up_{level}_attn_{i}")
            if level > 0:
                h = constrain(conv(h.shape[-1], 3, dtype, f"up_{level}_upsample")(upsample(h)))

        h = nn.silu(GroupNorm(cfg.groups, dtype, name="out_norm")(h))
        out_BxHxWxC = conv(cfg.channels, 3, dtype, "conv_out", zero=True,
                           axes=("conv_in", "image_channels"))(h)
        return out_BxHxWxC.astype(jnp.float32)


class TextUNet(nn.Module):
    """A text Encoder (submodule `encoder`, so an MLM checkpoint's params["encoder"] restores by name)
    whose hidden states a UNet (`unet`, text_width = the encoder's width) cross-attends to."""
    unet_config: UNetConfig
    encoder_config: EncoderConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, t_B, text_inputs_BxL, text_segment_ids_BxL, text_positions_BxL,
                 deterministic: bool = True):
        """Text segment ids: > 0 real tokens, 0 padding; a row of zeros is the null caption."""
        width = self.encoder_config.width
        if self.unet_config.text_width not in (0, width):
            raise ValueError(f"model.text_width={self.unet_config.text_width} must be 0 or the text "
                             f"encoder's width {width}")
        unet_config = dataclasses.replace(self.unet_config, text_width=width)
        context_BxLxD = Encoder(self.encoder_config, deterministic, name="encoder")(
            text_inputs_BxL, text_segment_ids_BxL, text_positions_BxL)
        return UNet(unet_config, name="unet")(x_BxHxWxC, t_B, None, context_BxLxD, text_segment_ids_BxL > 0,
                                              deterministic)
