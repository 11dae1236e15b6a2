"""Feature extractors ("torsos"): ``obs [N, ...] -> features [N, F]``.

Pixel observations arrive as EnvPool gives them, ``[N, C, H, W]`` uint8; each
torso converts them to float in ``[0, 1]`` once (:func:`pixels_to_float`) and
moves channels last for Flax's convolutions. Initialisation is orthogonal with
gain ``sqrt(2)`` and zero biases, as in the PPO literature (Engstrom et al.
2020, "Implementation Matters in Deep RL").
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SQRT2 = float(np.sqrt(2.0))


def ortho(gain: float = SQRT2):
    return nn.initializers.orthogonal(gain)


def im2col_patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int], padding: Any) -> jax.Array:
    """``[N, H, W, C]`` -> ``[N, OH, OW, kh * kw * C]``: every kernel window, features ordered
    (kh, kw, C), gathered by ``kh * kw`` strided slices of the padded input.

    XLA:CPU differentiates slices and a concatenation into pads and adds that run at memory speed;
    ``lax.conv_general_dilated_patches`` (an identity convolution) and its transpose in the
    backward pass made the Nature CNN's gradient step 2.7x slower
    (``benchmarks/results/cpu_learner_cpu-2core.md``).
    """
    kh, kw = kernel_size
    sh, sw = strides
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel_size, strides, padding)
    (pt, pb), (pl, pr) = padding
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    windows = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(windows, axis=-1)


class Conv(nn.Module):
    """2-D convolution, NHWC, with ``nn.Conv``'s parameters (``kernel [kh, kw, C, F]``,
    ``bias [F]``), so checkpoints move freely between backends.

    ``impl="auto"`` picks XLA's native convolution on GPU/TPU and an im2col
    formulation (patches + matmul) on CPU: XLA:CPU runs convolution *gradients*
    inside a ``while`` loop (our compiled chunks) about 10x slower than the
    matmul form (see ``benchmarks/results/cpu_conv_in_loop.md``). Outside a
    loop the opposite holds (im2col 5-9x slower), so code whose gradient step
    is not inside a loop (behaviour cloning) asks for ``impl="xla"``. The
    parameters are the same either way.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "VALID"
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    impl: str = "auto"
    param_dtype: Any = jnp.float32  # as nn.Conv: float32 parameters even with jax_enable_x64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, c, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        impl = self.impl
        if impl == "auto":
            impl = "im2col" if jax.default_backend() == "cpu" else "xla"
        if impl == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif impl == "im2col":
            # Patch features are ordered (kh, kw, C), the kernel's own layout: no transpose of either operand.
            y = im2col_patches(x, (kh, kw), self.strides, self.padding) @ kernel.reshape(kh * kw * c, self.features)
        else:
            raise ValueError(f"Conv impl={self.impl!r} is not accepted; use auto, xla or im2col.")
        return y + bias


def pixels_to_float(obs: jax.Array) -> jax.Array:
    """``[N, C, H, W]`` uint8 -> ``[N, H, W, C]`` float32 in ``[0, 1]``. Pixels
    are uint8 frames as EnvPool gives them; float input is refused (scaling it
    again by 1/255 would silently shrink it)."""
    if not jnp.issubdtype(obs.dtype, jnp.integer):
        raise TypeError(f"pixels_to_float takes uint8 frames [N, C, H, W] (as EnvPool gives them), got dtype "
                        f"{obs.dtype}; pass the frames unscaled.")
    x = jnp.transpose(obs, (0, 2, 3, 1)).astype(jnp.float32)
    return x / 255.0


def _norm(kind: str, x: jax.Array) -> jax.Array:
    """``norm="layer"``: per-sample LayerNorm over every feature axis (GroupNorm with one
    group on feature maps), as PQN's networks have after each layer; ``"none"``: ``x``."""
    if kind == "none":
        return x
    if kind != "layer":
        raise ValueError(f"norm={kind!r} is not accepted; use 'none' or 'layer'.")
    return nn.GroupNorm(num_groups=1)(x) if x.ndim == 4 else nn.LayerNorm()(x)


class NatureCNN(nn.Module):
    """Mnih et al. (2015) DQN torso: 32x8s4, 64x4s2, 64x3s1 convs, dense 512
    (``norm="layer"``: a LayerNorm after each, before the ReLU)."""

    features: int = 512
    conv_impl: str = "auto"
    """See :class:`Conv`: auto, xla or im2col."""
    norm: str = "none"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = pixels_to_float(obs)
        for ch, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
            x = Conv(ch, (k, k), (s, s), padding="VALID", kernel_init=ortho(), impl=self.conv_impl)(x)
            x = nn.relu(_norm(self.norm, x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.features, kernel_init=ortho(), bias_init=nn.initializers.zeros)(x)
        return nn.relu(_norm(self.norm, x))


class _ResidualBlock(nn.Module):
    channels: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        y = nn.relu(x)
        y = Conv(self.channels, (3, 3), padding="SAME", kernel_init=ortho(), impl=self.conv_impl)(y)
        y = nn.relu(y)
        y = Conv(self.channels, (3, 3), padding="SAME", kernel_init=ortho(), impl=self.conv_impl)(y)
        return x + y


class ImpalaCNN(nn.Module):
    """Espeholt et al. (2018) IMPALA torso: per stage conv3x3, maxpool 3x3/2,
    two residual blocks; then ReLU, flatten, dense ``features``."""

    channels: Sequence[int] = (16, 32, 32)
    features: int = 256
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = pixels_to_float(obs)
        for ch in self.channels:
            x = Conv(ch, (3, 3), padding="SAME", kernel_init=ortho(), impl=self.conv_impl)(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            x = _ResidualBlock(ch, self.conv_impl)(x)
            x = _ResidualBlock(ch, self.conv_impl)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, kernel_init=ortho())(x))


class ConvBlock(nn.Module):
    """The conv block of the ncps Atari workloads: four 5x5 stride-2 convs with
    64-128-128-256 channels and ReLU, then global average pooling -> 256.

    ``norm="layer"`` adds a per-sample normalisation (GroupNorm with one group,
    i.e. LayerNorm over H, W, C) after each conv, a batch-statistics-free
    stand-in for the workload's batch norm.
    """

    channels: Sequence[int] = (64, 128, 128, 256)
    norm: str = "none"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = pixels_to_float(obs)
        for ch in self.channels:
            x = Conv(ch, (5, 5), (2, 2), padding=((2, 2), (2, 2)), kernel_init=ortho(), impl=self.conv_impl)(x)
            x = nn.relu(_norm(self.norm, x))
        return x.mean(axis=(1, 2))


class MLP(nn.Module):
    """MLP torso for vector observations (``[N, D]``), tanh by default
    (``norm="layer"``: a LayerNorm after each layer, before the activation)."""

    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"
    norm: str = "none"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        act = {"tanh": nn.tanh, "relu": nn.relu}[self.activation]
        x = obs.reshape(obs.shape[0], -1).astype(jnp.float32)
        for h in self.hidden:
            x = act(_norm(self.norm, nn.Dense(h, kernel_init=ortho(), bias_init=nn.initializers.zeros)(x)))
        return x


TORSOS = {"nature": NatureCNN, "impala": ImpalaCNN, "convblock": ConvBlock, "mlp": MLP}
