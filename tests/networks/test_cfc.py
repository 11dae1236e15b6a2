"""Tests for jaxatari.networks.cfc: NumPy references, ncps equivalence, resets, jit."""

from __future__ import annotations

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxatari.networks import cfc, ncps_weights
from jaxatari.networks import wirings as nw

ATOL = 1e-5


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------

_NP_ACT = {
    "lecun_tanh": lambda x: 1.7159 * np.tanh(0.666 * x),
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_cell(p, x, h, ts, *, mode, activation="lecun_tanh", mask=None):
    """One CfC step in NumPy (float64). p: the cell's Flax params; ts: scalar or [B]."""
    ts = np.asarray(ts, np.float64)
    ts = ts[:, None] if ts.ndim == 1 else ts
    z = np.concatenate([x, h], -1).astype(np.float64)
    i = 0
    while f"backbone_{i}" in p:
        z = _NP_ACT[activation](z @ p[f"backbone_{i}"]["kernel"] + p[f"backbone_{i}"]["bias"])
        i += 1
    m = 1.0 if mask is None else mask

    def lin(name, masked=False):
        return z @ (p[name]["kernel"] * (m if masked else 1.0)) + p[name]["bias"]

    ff1 = lin("ff1", True)
    if mode == "pure":
        a, w_tau = p["A"], p["w_tau"]
        return -a * np.exp(-ts * (np.abs(w_tau) + np.abs(ff1))) * ff1 + a
    f1, f2 = np.tanh(ff1), np.tanh(lin("ff2", True))
    t = _sigmoid(lin("time_a") * ts + lin("time_b"))
    return f1 * (1 - t) + t * f2 if mode == "default" else f1 + t * f2


def np_sequence(p, x, h0, reset, timespans, *, mode, activation="lecun_tanh"):
    """A plain CfC over [T, B, F] with resets and timespans, as a Python loop."""
    h = np.asarray(h0, np.float64)
    outs = []
    for t in range(x.shape[0]):
        h = np.where(reset[t][:, None], 0.0, h)
        h = np_cell(p["rnn_cell"], x[t], h, timespans[t], mode=mode, activation=activation)
        outs.append(h)
    return np.stack(outs), h


def _np_params(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _random_params(module, *args, seed=0, scale=0.5):
    """Random float32 params with the module's param shapes, without compiling its init."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(scale * rng.normal(size=l.shape), jnp.float32) for l in leaves]
    )


def _random_cell_params(rng, f, h, *, mode, backbone_layers, units=5):
    def lin(i, o):
        return {"kernel": rng.normal(size=(i, o)), "bias": rng.normal(size=(o,))}

    p, width = {}, f + h
    for i in range(backbone_layers):
        p[f"backbone_{i}"] = lin(width, units)
        width = units
    p["ff1"] = lin(width, h)
    if mode == "pure":
        p["w_tau"] = rng.normal(size=(h,))
        p["A"] = rng.normal(size=(h,))
    else:
        for name in ("ff2", "time_a", "time_b"):
            p[name] = lin(width, h)
    return p


# ---------------------------------------------------------------------------
# The cell against hand-computed values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        # x = h = 0, so every pre-activation is its bias: ff1 = 0.5, ff2 = -0.5,
        # time_a = 1, time_b = 0, ts = 2 -> t = sigmoid(2) = 0.88079708.
        # default: tanh(.5)(1 - t) + t tanh(-.5) = tanh(.5)(1 - 2t) = 0.46211716 * -0.76159416
        ("default", -0.35194573),
        # no_gate: tanh(.5) + t tanh(-.5) = tanh(.5)(1 - t) = 0.46211716 * 0.11920292
        ("no_gate", 0.05508572),
        # pure with A = 2, w_tau = -0.5: -2 exp(-2 (0.5 + 0.5)) 0.5 + 2 = 2 - e^-2
        ("pure", 1.86466472),
    ],
)
def test_cell_hand_derived_numbers(mode, expected):
    zeros = np.zeros((2, 1), np.float32)

    def lin(b):
        return {"kernel": zeros, "bias": np.array([b], np.float32)}

    p = {"ff1": lin(0.5)}
    if mode == "pure":
        p.update(A=np.array([2.0], np.float32), w_tau=np.array([-0.5], np.float32))
    else:
        p.update(ff2=lin(-0.5), time_a=lin(1.0), time_b=lin(0.0))
    cell = cfc.CfCCell(1, mode=mode, backbone_layers=0)
    h, y = cell.apply({"params": p}, jnp.zeros((1, 1)), jnp.zeros((1, 1)), 2.0)
    np.testing.assert_allclose(np.asarray(h), [[expected]], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(y))


@pytest.mark.parametrize("mode", cfc.MODES)
@pytest.mark.parametrize(
    "backbone_layers, activation", [(0, "lecun_tanh"), (1, "lecun_tanh"), (2, "silu"), (1, "relu")]
)
@pytest.mark.parametrize("per_batch_ts", [False, True])
def test_cell_matches_numpy(mode, backbone_layers, activation, per_batch_ts):
    rng = np.random.default_rng(0)
    b, f, h = 3, 4, 6
    p = _random_cell_params(rng, f, h, mode=mode, backbone_layers=backbone_layers)
    x, h0 = rng.normal(size=(b, f)), rng.normal(size=(b, h))
    ts = np.array([0.25, 1.0, 3.0]) if per_batch_ts else 0.7
    cell = cfc.CfCCell(h, mode=mode, backbone_units=5, backbone_layers=backbone_layers, activation=activation)
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    got, _ = cell.apply(
        {"params": p32}, jnp.asarray(h0, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(ts, jnp.float32)
    )
    want = np_cell(_np_params(p32), np.float32(x), np.float32(h0), ts, mode=mode, activation=activation)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-5)


def test_wired_cell_matches_numpy():
    """Layer l reads layer l-1 through its mask (ff1/ff2 only) and its own state densely."""
    rng = np.random.default_rng(4)
    masks = [rng.random((5, 4)) < 0.5, rng.random((4, 3)) < 0.5, rng.random((3, 2)) < 0.5]
    wiring = nw.LayeredWiring(masks)
    assert wiring.layer_sizes == (4, 3, 2) and wiring.units == 9 and wiring.output_size == 2
    cell = cfc.WiredCfCCell(wiring, mode="no_gate")
    b = 3
    x, h = rng.normal(size=(b, 5)).astype(np.float32), rng.normal(size=(b, 9)).astype(np.float32)
    ts = np.array([0.5, 1.0, 2.0], np.float32)
    params = _random_params(cell, jnp.asarray(h), jnp.asarray(x), jnp.asarray(ts), scale=1.0)
    new_h, y = cell.apply(params, jnp.asarray(h), jnp.asarray(x), jnp.asarray(ts))

    p = _np_params(params["params"])
    inputs, states, offset = x, [], 0
    for l, m in enumerate(masks):
        n = m.shape[1]
        full = np.concatenate([m, np.ones((n, n))], 0).astype(np.float64)
        inputs = np_cell(p[f"layer_{l}"], inputs, h[:, offset : offset + n], ts, mode="no_gate", mask=full)
        states.append(inputs)
        offset += n
    np.testing.assert_allclose(new_h, np.concatenate(states, -1), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(y, states[-1], atol=ATOL, rtol=1e-5)


def test_per_batch_ts_is_per_row():
    """A [B] ts equals running each row with its own scalar ts."""
    cell = cfc.CfCCell(4, backbone_units=8)
    x, h = jnp.ones((3, 2)), jnp.full((3, 4), 0.3)
    params = _random_params(cell, h, x)
    ts = jnp.array([0.1, 1.0, 5.0])
    got, _ = cell.apply(params, h, x, ts)
    for i in range(3):
        row, _ = cell.apply(params, h[i : i + 1], x[i : i + 1], ts[i])
        np.testing.assert_allclose(got[i : i + 1], row, atol=1e-6)


def test_lstm_update_matches_numpy():
    rng = np.random.default_rng(1)
    z, c = rng.normal(size=(2, 12)), rng.normal(size=(2, 3))
    i, ig, fg, og = np.split(z, 4, axis=-1)
    c_want = c * _sigmoid(fg + 1.0) + np.tanh(i) * _sigmoid(ig)
    h_want = np.tanh(c_want) * _sigmoid(og)
    h, c_new = cfc.lstm_update(jnp.asarray(z, jnp.float32), jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(h, h_want, atol=1e-6)
    np.testing.assert_allclose(c_new, c_want, atol=1e-6)


def test_reset_state_and_zero_state():
    state = cfc.MixedMemoryState(jnp.ones((3, 2)), jnp.full((3, 2), 2.0))
    out = cfc.reset_state(state, jnp.array([True, False, True]))
    np.testing.assert_array_equal(out.h, [[0, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(out.c, [[0, 0], [2, 2], [0, 0]])
    z = cfc.zero_state(4, 5, mixed_memory=True)
    assert isinstance(z, cfc.MixedMemoryState) and z.h.shape == z.c.shape == (4, 5)
    assert cfc.CfC(5).initialize_carry(4).shape == (4, 5)


# ---------------------------------------------------------------------------
# Equivalence with ncps.torch.CfC
# ---------------------------------------------------------------------------

# (ncps kwargs, ours kwargs, batch, give timespans, give initial state)
_NCPS_CASES = {
    "default-bb1": (dict(units=8, backbone_units=16), dict(hidden_size=8, backbone_units=16), 3, True, True),
    "no_gate-bb0-proj": (
        dict(units=6, mode="no_gate", backbone_layers=0, proj_size=3),
        dict(hidden_size=6, mode="no_gate", backbone_layers=0, proj_size=3),
        2,
        True,
        False,
    ),
    "pure-bb2-silu-proj": (
        dict(units=7, mode="pure", backbone_layers=2, backbone_units=12, activation="silu", proj_size=4),
        dict(hidden_size=7, mode="pure", backbone_layers=2, backbone_units=12, activation="silu", proj_size=4),
        3,
        True,
        True,
    ),
    "default-bb3-dropout-gelu-mixed": (
        dict(units=5, backbone_layers=3, backbone_units=9, backbone_dropout=0.3, activation="gelu", mixed_memory=True),
        dict(hidden_size=5, backbone_layers=3, backbone_units=9, backbone_dropout=0.3, activation="gelu", mixed_memory=True),
        2,
        True,
        True,
    ),
    "no_gate-mixed-proj-tanh": (
        dict(units=6, mode="no_gate", backbone_units=10, activation="tanh", mixed_memory=True, proj_size=2),
        dict(hidden_size=6, mode="no_gate", backbone_units=10, activation="tanh", mixed_memory=True, proj_size=2),
        3,
        False,
        False,
    ),
    "pure-bb0-mixed-relu": (
        dict(units=4, mode="pure", backbone_layers=0, activation="relu", mixed_memory=True),
        dict(hidden_size=4, mode="pure", backbone_layers=0, activation="relu", mixed_memory=True),
        2,
        True,
        True,
    ),
    "last-only": (
        dict(units=6, backbone_units=8, proj_size=2, return_sequences=False),
        dict(hidden_size=6, backbone_units=8, proj_size=2, return_sequences=False),
        3,
        True,
        True,
    ),
    # Wired: ncps broadcasts a [B] timespan over units, correct only for B == 1.
    "autoncp-default": ("auto", dict(mode="default"), 3, False, True),
    "autoncp-no_gate-ts": ("auto", dict(mode="no_gate"), 1, True, True),
    "autoncp-pure-mixed-proj": ("auto", dict(mode="pure", mixed_memory=True, proj_size=2), 1, True, True),
}

_WIRING = dict(units=14, output_size=3, sparsity_level=0.6, seed=7)


def _ncps_pair(case, f):
    """An ncps.torch.CfC in eval mode and the matching Flax CfC."""
    import torch
    from ncps import wirings

    theirs, ours, *_ = _NCPS_CASES[case]
    if theirs == "auto":
        theirs = dict(units=wirings.AutoNCP(**_WIRING), mode=ours["mode"])
        theirs.update({k: v for k, v in ours.items() if k in ("mixed_memory", "proj_size")})
        ours = dict(ours, wiring=nw.AutoNCP(**_WIRING))
    from ncps.torch import CfC as TorchCfC

    torch.manual_seed(list(_NCPS_CASES).index(case))
    model = TorchCfC(f, **theirs).eval()
    with torch.no_grad():  # make every parameter, biases included, clearly non-trivial
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model, cfc.CfC(**ours)


@pytest.mark.parametrize("case", list(_NCPS_CASES))
def test_matches_ncps(case):
    torch = pytest.importorskip("torch")
    pytest.importorskip("ncps")
    _, _, b, with_ts, with_h0 = _NCPS_CASES[case]
    t, f = 6, 5
    model, ours = _ncps_pair(case, f)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    params = ncps_weights.params_from_ncps(state_dict)
    # Our init and the conversion produce the same tree of shapes.
    init = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((t, b, f)))["params"]
    chex.assert_trees_all_equal_shapes(init, params)

    rng = np.random.default_rng(3)
    x = rng.normal(size=(t, b, f)).astype(np.float32)
    ts = rng.uniform(0.1, 3.0, size=(t, b)).astype(np.float32)
    s = ours.state_size
    h0 = rng.normal(size=(b, s)).astype(np.float32) * 0.5
    c0 = rng.normal(size=(b, s)).astype(np.float32) * 0.5
    mixed = ours.mixed_memory

    kwargs = {}
    if with_ts:
        # ncps squeezes timespans[:, t] and broadcasts it against [B, H]; give
        # it [B, T, H] so that every unit of row b sees ts[t, b] (or [1, T]).
        tts = ts.T if b == 1 else np.repeat(ts.T[:, :, None], s, axis=2)
        kwargs["timespans"] = torch.from_numpy(np.ascontiguousarray(tts))
    if with_h0:
        kwargs["hx"] = (torch.from_numpy(h0), torch.from_numpy(c0)) if mixed else torch.from_numpy(h0)
    with torch.no_grad():
        want_out, want_state = model(torch.from_numpy(x.transpose(1, 0, 2).copy()), **kwargs)

    init_state = None
    if with_h0:
        init_state = cfc.MixedMemoryState(jnp.asarray(h0), jnp.asarray(c0)) if mixed else jnp.asarray(h0)
    out, state = ours.apply(
        {"params": params},
        jnp.asarray(x),
        init_state,
        timespans=jnp.asarray(ts) if with_ts else None,
    )
    want_out = want_out.numpy()
    if ours.return_sequences:
        want_out = want_out.transpose(1, 0, 2)
    assert out.shape == want_out.shape
    np.testing.assert_allclose(np.asarray(out), want_out, atol=ATOL)
    if mixed:
        assert isinstance(state, cfc.MixedMemoryState)
        np.testing.assert_allclose(state.h, want_state[0].numpy(), atol=ATOL)
        np.testing.assert_allclose(state.c, want_state[1].numpy(), atol=ATOL)
    else:
        np.testing.assert_allclose(np.asarray(state), want_state.numpy(), atol=ATOL)


@pytest.mark.parametrize(
    "units, output_size, sparsity_level, seed, input_size",
    [(14, 3, 0.6, 7, 5), (32, 6, 0.5, 22222, 40), (19, 2, 0.9, 1, 3), (64, 18, 0.1, 123, 256)],
)
def test_autoncp_masks_identical_to_ncps(units, output_size, sparsity_level, seed, input_size):
    pytest.importorskip("ncps")
    from ncps import wirings

    theirs = wirings.AutoNCP(units, output_size, sparsity_level=sparsity_level, seed=seed)
    theirs.build(input_size)
    ours = nw.AutoNCP(units, output_size, sparsity_level=sparsity_level, seed=seed)
    sens, adj = nw.ncp_adjacency(ours, input_size)
    np.testing.assert_array_equal(sens, theirs.sensory_adjacency_matrix)
    np.testing.assert_array_equal(adj, theirs.adjacency_matrix)
    layers = ours.build(input_size)
    assert layers.layer_sizes == tuple(len(theirs.get_neurons_of_layer(l)) for l in range(3))
    assert ours.ncp.units == units and layers.output_size == output_size
    # The masks ncps' WiredCfCCell derives (without building torch modules).
    prev = None
    for l, mask in enumerate(layers.masks):
        neurons = theirs.get_neurons_of_layer(l)
        if l == 0:
            want = theirs.sensory_adjacency_matrix[:, neurons]
        else:
            want = theirs.adjacency_matrix[:, neurons][prev, :]
        np.testing.assert_array_equal(mask, np.abs(want))
        prev = neurons


def test_wiring_from_ncps_and_mask_check():
    pytest.importorskip("torch")
    pytest.importorskip("ncps")
    model, _ = _ncps_pair("autoncp-default", 5)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    wiring = ncps_weights.wiring_from_ncps(sd)
    assert wiring == nw.AutoNCP(**_WIRING).build(5)
    ncps_weights.params_from_ncps(sd, wiring=nw.AutoNCP(**_WIRING))  # matches: no error
    with pytest.raises(ValueError, match="differ from"):
        ncps_weights.params_from_ncps(sd, wiring=nw.AutoNCP(**dict(_WIRING, seed=8)))
    with pytest.raises(ValueError, match="input features"):
        ncps_weights.params_from_ncps(sd, wiring=nw.AutoNCP(**_WIRING).build(6))


def test_any_ncps_wiring_runs_via_wiring_from_ncps():
    """A wiring we have no class for (ncps' Random) runs from its state_dict masks."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("ncps")
    from ncps import wirings
    from ncps.torch import CfC as TorchCfC

    torch.manual_seed(0)
    model = TorchCfC(5, wirings.Random(8, 8, sparsity_level=0.5, random_seed=3)).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = cfc.CfC(wiring=ncps_weights.wiring_from_ncps(sd))
    x = np.random.default_rng(0).normal(size=(4, 2, 5)).astype(np.float32)
    with torch.no_grad():
        want, want_h = model(torch.from_numpy(x.transpose(1, 0, 2).copy()))
    out, h = ours.apply({"params": ncps_weights.params_from_ncps(sd)}, jnp.asarray(x))
    np.testing.assert_allclose(out, want.numpy().transpose(1, 0, 2), atol=ATOL)
    np.testing.assert_allclose(h, want_h.numpy(), atol=ATOL)


def test_params_from_ncps_errors_name_keys():
    pytest.importorskip("torch")
    pytest.importorskip("ncps")
    model, _ = _ncps_pair("default-bb1", 5)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rnn_cell\.extra"):
        ncps_weights.params_from_ncps({**sd, "rnn_cell.extra": np.zeros(3)})
    missing = {k: v for k, v in sd.items() if k != "rnn_cell.time_a.weight"}
    with pytest.raises(ValueError, match=r"rnn_cell\.time_a\.weight"):
        ncps_weights.params_from_ncps(missing)
    with pytest.raises(ValueError, match="no 'rnn_cell"):
        ncps_weights.params_from_ncps({"fc.weight": np.zeros((2, 2)), "fc.bias": np.zeros(2)})
    with pytest.raises(ValueError, match="no wired layers"):
        ncps_weights.params_from_ncps(sd, wiring=nw.AutoNCP(12, 3))


def test_init_follows_ncps_initialisers():
    """Our init draws from the distributions ncps' init produces (xavier, torch defaults, orthogonal)."""
    f, h, u, p = 5, 6, 40, 3
    model = cfc.CfC(h, backbone_units=u, mixed_memory=True, proj_size=p)
    pure = cfc.CfCCell(h, mode="pure", backbone_layers=0)

    @jax.jit
    def init(key):
        k1, k2 = jax.random.split(key)
        return model.init(k1, jnp.zeros((2, 2, f)))["params"], pure.init(k2, jnp.zeros((2, h)), jnp.zeros((2, f)))["params"]

    params, pure_params = init(jax.random.key(0))

    def xavier(i, o):
        return np.sqrt(6.0 / (i + o))

    cell = params["rnn_cell"]
    bounds = {
        "backbone kernel": (cell["backbone_0"]["kernel"], xavier(f + h, u)),
        "backbone bias": (cell["backbone_0"]["bias"], 1 / np.sqrt(f + h)),
        "ff1 kernel": (cell["ff1"]["kernel"], xavier(u, h)),
        "time_b kernel": (cell["time_b"]["kernel"], xavier(u, h)),
        "ff2 bias": (cell["ff2"]["bias"], 1 / np.sqrt(u)),
        "lstm input kernel": (params["lstm"]["input_map"]["kernel"], xavier(f, 4 * h)),
        "lstm bias": (params["lstm"]["input_map"]["bias"], 0.1),
        "fc kernel": (params["fc"]["kernel"], 1 / np.sqrt(h)),
        "fc bias": (params["fc"]["bias"], 1 / np.sqrt(h)),
        "w_tau": (pure_params["w_tau"], xavier(1, h)),
        "A": (pure_params["A"], xavier(1, h)),
    }
    for name, (value, bound) in bounds.items():
        value = np.abs(np.asarray(value))
        assert value.max() <= bound, name
        if value.size >= 20:
            assert value.max() > 0.7 * bound, name
    rec = np.asarray(params["lstm"]["recurrent_map"]["kernel"])  # [H, 4H], orthonormal rows
    np.testing.assert_allclose(rec @ rec.T, np.eye(h), atol=1e-5)


def test_module_imports_without_torch():
    code = "import sys, jaxatari.networks.cfc; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# Resets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hidden_size=5, backbone_units=8),
        dict(wiring=nw.AutoNCP(10, 2), mixed_memory=True, proj_size=3),
    ],
    ids=["plain", "wired-mixed-proj"],
)
def test_reset_zeroes_state_exactly_where_set(kwargs):
    """A reset at (t, b) equals restarting row b from zeros at t; nothing else changes."""
    t, b, f = 8, 3, 4
    model = cfc.CfC(**kwargs)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(t, b, f)), jnp.float32)
    ts = jnp.asarray(rng.uniform(0.5, 2.0, size=(t, b)), jnp.float32)
    params = _random_params(model, x)
    apply = jax.jit(model.apply)
    # A nonzero initial state, LSTM memory included.
    init = jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape), jnp.float32), model.initialize_carry(b))
    reset = np.zeros((t, b), bool)
    reset[3, 0] = True  # row 0: one reset mid-sequence
    reset[0, 1] = reset[5, 1] = True  # row 1: reset at the start and later
    # row 2: never reset
    out, final = apply(params, x, init, jnp.asarray(reset), ts)

    for row in range(2):
        starts = [0] + [s for s in np.flatnonzero(reset[:, row]) if s > 0] + [t]
        state = jax.tree.map(lambda z: z[row : row + 1], init)
        if reset[0, row]:
            state = jax.tree.map(jnp.zeros_like, state)
        for lo, hi in zip(starts[:-1], starts[1:]):
            no_reset = jnp.zeros((hi - lo, 1), bool)
            seg_out, state = apply(params, x[lo:hi, row : row + 1], state, no_reset, ts[lo:hi, row : row + 1])
            np.testing.assert_allclose(out[lo:hi, row : row + 1], seg_out, atol=ATOL)
            state_after = state
            state = jax.tree.map(jnp.zeros_like, state)  # the next segment starts from zeros
        chex.assert_trees_all_close(jax.tree.map(lambda z: z[row : row + 1], final), state_after, atol=ATOL)

    # Only where set: row 2, and row 0 before its reset, equal a run without resets.
    out_none, final_none = apply(params, x, init, jnp.zeros((t, b), bool), ts)
    np.testing.assert_array_equal(out[:, 2], out_none[:, 2])
    chex.assert_trees_all_equal(jax.tree.map(lambda z: z[2], final), jax.tree.map(lambda z: z[2], final_none))
    np.testing.assert_array_equal(out[:3, 0], out_none[:3, 0])
    assert not np.allclose(out[3:, 0], out_none[3:, 0])


# ---------------------------------------------------------------------------
# jit / no-jit against a NumPy loop
# ---------------------------------------------------------------------------


class CfCVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sequence_matches_numpy_loop(self):
        t, b, f, h = 7, 3, 4, 5
        for mode in cfc.MODES:
            model = cfc.CfC(h, mode=mode, backbone_units=6, backbone_layers=2, activation="tanh")
            rng = np.random.default_rng(2)
            x = rng.normal(size=(t, b, f)).astype(np.float32)
            h0 = rng.normal(size=(b, h)).astype(np.float32)
            reset = rng.random((t, b)) < 0.25
            ts = rng.uniform(0.1, 2.0, size=(t, b)).astype(np.float32)
            params = _random_params(model, jnp.asarray(x), seed=1)

            apply = self.variant(lambda p, x, h0, r, ts, m=model: m.apply(p, x, h0, r, ts))
            out, final = apply(params, jnp.asarray(x), jnp.asarray(h0), jnp.asarray(reset), jnp.asarray(ts))
            chex.assert_shape(out, (t, b, h))
            want_out, want_final = np_sequence(
                _np_params(params["params"]), x, h0, reset, ts, mode=mode, activation="tanh"
            )
            np.testing.assert_allclose(np.asarray(out), want_out, atol=ATOL, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(final), want_final, atol=ATOL, rtol=1e-5)


def test_jit_compiles_once_for_new_data():
    model = cfc.CfC(4, backbone_units=8)
    x = jnp.ones((5, 2, 3))
    params = _random_params(model, x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(p, x, r, ts):
        return model.apply(p, x, None, r, ts)

    r = jnp.zeros((5, 2), bool)
    for i in range(3):
        run(params, x + i, r.at[i, 0].set(True), jnp.full((5, 2), 0.5 + i))


def test_dropout_only_when_training():
    model = cfc.CfC(4, backbone_units=16, backbone_layers=2, backbone_dropout=0.5)
    x = jnp.ones((3, 2, 3))
    params = _random_params(model, x)
    eval_out, _ = model.apply(params, x)
    train_out, _ = model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(eval_out, train_out)
    np.testing.assert_array_equal(eval_out, model.apply(params, x)[0])


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: cfc.CfCCell(4, mode="fast"), r"mode 'fast'.*'default', 'no_gate', 'pure'"),
        (lambda: cfc.CfC(4, activation="swish"), r"activation 'swish'.*lecun_tanh"),
        (lambda: cfc.CfC(4, mode="liquid"), r"mode 'liquid'"),
        (lambda: cfc.CfC(), "hidden_size"),
        (lambda: cfc.CfC(0), "hidden_size must be an integer >= 1, got 0"),
        (lambda: cfc.CfC(4, backbone_layers=-1), "backbone_layers"),
        (lambda: cfc.CfC(4, backbone_dropout=1.5), "backbone_dropout"),
        (lambda: cfc.CfC(4, proj_size=0), "proj_size"),
        (lambda: cfc.CfC(wiring=nw.AutoNCP(12, 3), backbone_layers=1), "backbone_layers=1 cannot be used"),
        (lambda: cfc.CfC(10, wiring=nw.AutoNCP(12, 3)), "hidden_size=10 does not match the wiring's 12"),
        (lambda: cfc.CfC(wiring="ncp"), "wiring must be an AutoNCP"),
        (lambda: nw.AutoNCP(10, 8), "output_size must be < units - 2"),
        (lambda: nw.AutoNCP(10, 2, sparsity_level=0.05), r"sparsity_level must be in \[0.1, 1.0\]"),
        (lambda: nw.NCP(4, 3, 2, 5, 1, 1, 1), "sensory_fanout=5 exceeds inter_neurons=4"),
        (lambda: nw.LayeredWiring([np.ones((3, 4)), np.ones((5, 2))]), "has 5 input rows"),
    ],
)
def test_bad_config_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_shapes_raise():
    model = cfc.CfC(4, backbone_units=8)
    x = jnp.ones((5, 2, 3))
    params = _random_params(model, x)
    with pytest.raises(ValueError, match=r"x \[T, B, F\], got shape \(2, 3\)"):
        model.apply(params, x[0])
    with pytest.raises(ValueError, match=r"reset must have shape \[T, B\]=\(5, 2\), got \(5,\)"):
        model.apply(params, x, None, jnp.zeros(5, bool))
    with pytest.raises(ValueError, match=r"timespans must be a scalar or have shape \[T, B\]"):
        model.apply(params, x, None, None, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 4\), got \(2, 5\)"):
        model.apply(params, x, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="got a tuple"):
        model.apply(params, x, (jnp.zeros((2, 4)), jnp.zeros((2, 4))))
    mixed = cfc.CfC(4, backbone_units=8, mixed_memory=True)
    mparams = _random_params(mixed, x)
    with pytest.raises(ValueError, match="MixedMemoryState"):
        mixed.apply(mparams, x, jnp.zeros((2, 4)))
    cell = cfc.CfCCell(4, backbone_units=8)
    with pytest.raises(ValueError, match=r"ts \(the elapsed time\)"):
        cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.ones(3))
    wired = cfc.CfC(wiring=nw.AutoNCP(12, 3).build(3))
    with pytest.raises(ValueError, match="built for 3 input features, got inputs with 4"):
        wired.init(jax.random.key(0), jnp.ones((5, 2, 4)))
