"""Torsos, actor-critic heads and the network spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari.networks import (NetworkSpec, QNetwork, init_actor_critic, initial_carry,
                               pixels_to_float, resolve_network_spec)


@pytest.mark.parametrize("torso", ["nature", "impala"])
def test_pixel_actor_critic_shapes(torso):
    spec = resolve_network_spec(torso, num_actions=6, atari=True)
    net, params = init_actor_critic(spec, jax.random.PRNGKey(0), (4, 84, 84), jnp.uint8)
    carry, logits, values = net.apply(params, (), jnp.zeros((5, 3, 4, 84, 84), jnp.uint8), jnp.zeros((5, 3), bool))
    assert logits.shape == (5, 3, 6) and values.shape == (5, 3) and carry == ()


def test_pixels_scaled_once():
    obs = jnp.full((1, 4, 2, 2), 255, jnp.uint8)
    x = pixels_to_float(obs)
    assert x.shape == (1, 2, 2, 4) and float(x.max()) == 1.0


@pytest.mark.parametrize("torso", ["nature", "impala", "mlp"])
def test_init_is_orthogonal_with_the_published_gains(torso):
    """Every kernel, as a [fan_in, fan_out] matrix, is orthogonal with gain sqrt(2) (torso), 0.01 (policy head) or
    1 (value head), biases are 0, and two observations give two different non-zero outputs: catches an all-zero,
    constant or wrongly scaled initialisation."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(2, 1, 4)).astype(np.float32) if torso == "mlp" else rng.integers(
        0, 256, (2, 1, 4, 84, 84), np.uint8)
    spec = resolve_network_spec(torso, num_actions=6, atari=torso != "mlp")  # 6 as above: its compiled init reused
    net, params = init_actor_critic(spec, jax.random.PRNGKey(0), obs.shape[2:], obs.dtype)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if "bias" in name:
            np.testing.assert_array_equal(x, 0.0, err_msg=name)
            continue
        gain = 0.01 if "['pi']" in name else 1.0 if "['v']" in name else np.sqrt(2.0)
        w = np.asarray(x).reshape(-1, x.shape[-1]) / gain
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # the smaller side is orthonormal
        np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-4, err_msg=name)
    _, logits, values = jax.jit(net.apply)(params, (), obs, jnp.zeros(obs.shape[:2], bool))
    for out in (logits, values):
        assert np.all(out != 0) and np.all(out[0] != out[1])


def test_mlp_is_unshared_and_roundtrips_json():
    spec = resolve_network_spec("auto", num_actions=2, atari=False)
    assert spec.torso == "mlp" and not spec.shared
    assert NetworkSpec.from_json(spec.to_json()) == spec
    net, params = init_actor_critic(spec, jax.random.PRNGKey(0), (4,), jnp.float32)
    assert "critic_torso" in params["params"]
    assert initial_carry(spec, 3) == ()


def test_bad_network_choices():
    with pytest.raises(ValueError, match="--network 'lstm'"):
        resolve_network_spec("lstm", num_actions=2, atari=True)
    with pytest.raises(ValueError, match="Atari pixels need"):
        resolve_network_spec("mlp", num_actions=2, atari=True)
    with pytest.raises(ValueError, match="vector observations need the mlp torso"):
        resolve_network_spec("impala", num_actions=2, atari=False)


def test_q_network():
    spec = resolve_network_spec("nature", num_actions=6, atari=True)
    q = QNetwork(spec)
    params = q.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 84, 84), jnp.uint8))
    assert q.apply(params, jnp.zeros((7, 4, 84, 84), jnp.uint8)).shape == (7, 6)


@pytest.mark.parametrize("padding,stride,k", [
    ("VALID", 4, 5), ("SAME", 1, 5), (((2, 2), (2, 2)), 2, 5),  # windows by slices
    ("VALID", 4, 8), ("VALID", 2, 4), ("SAME", 2, 4), (((1, 2), (0, 1)), 2, 4),  # folded space-to-depth first
])
def test_conv_im2col_matches_xla_and_flax(padding, stride, k):
    import flax.linen as nn

    from jaxatari.networks.torsos import Conv

    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 21, 21, 3))
    a = Conv(4, (k, k), (stride, stride), padding=padding, impl="im2col")
    params = a.init(jax.random.PRNGKey(1), x)
    y_im2col = a.apply(params, x)
    y_xla = Conv(4, (k, k), (stride, stride), padding=padding, impl="xla").apply(params, x)
    y_flax = nn.Conv(4, (k, k), (stride, stride), padding=padding).apply(params, x)
    np.testing.assert_allclose(y_im2col, y_xla, atol=1e-5)
    np.testing.assert_allclose(y_xla, y_flax, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "im2col"])
def test_torso_parameters_are_float32_even_with_x64(impl):
    """As flax's own layers: float64 kernels would train in float64 on CPU, fail the
    XLA convolution against float32 frames, and mismatch float32 checkpoints."""
    from jaxatari.networks.torsos import NatureCNN

    with jax.enable_x64(True):
        net = NatureCNN(conv_impl=impl)
        params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 84, 84), jnp.uint8))
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
        assert net.apply(params, jnp.zeros((1, 4, 84, 84), jnp.uint8)).dtype == jnp.float32


def test_pixel_torsos_refuse_float_frames():
    """Frames already scaled to [0, 1] would be scaled again by 1/255: refused, naming the dtype."""
    from jaxatari.networks.torsos import pixels_to_float

    assert pixels_to_float(jnp.full((1, 4, 2, 2), 255, jnp.uint8)).max() == 1.0
    with pytest.raises(TypeError, match=r"takes uint8 frames .* got dtype float32"):
        pixels_to_float(jnp.zeros((1, 4, 2, 2), jnp.float32))
