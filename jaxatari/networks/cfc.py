"""Closed-form continuous-time (CfC) recurrent networks in Flax.

The CfC cell approximates the closed-form solution of a liquid time-constant
ODE, so one step costs a few dense layers instead of an ODE solve (Hasani,
Lechner, Amini, Liebenwein, Ray, Tschaikowski, Teschl, Rus, "Closed-form
continuous-time neural networks", Nature Machine Intelligence 4, 992-1003
(2022), arXiv:2106.13898).  Given the same weights, inputs and elapsed times,
every output and the final state match ``ncps.torch.CfC`` (ncps 1.0.1) to
float32 rounding; :func:`~jaxatari.networks.ncps_weights.params_from_ncps`
converts its ``state_dict()``, and the NCP wirings are in
:mod:`jaxatari.networks.wirings`.

Conventions: arrays are time-major (``x [T, B, F]``, ``reset`` and
``timespans [T, B]``); dense kernels are ``[in, out]`` (a ``torch.nn.Linear``
weight transposed).  The state is ``h [B, state_size]``, or with
``mixed_memory=True`` ``MixedMemoryState(h, c)`` (ncps' ``(h, c)``: CfC state
and LSTM cell memory).  A wired CfC's state is its layers' states
concatenated in layer order (for an NCP: inter, command, motor neurons).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxatari.networks.wirings import _check_choice, _check_int, _FrozenArray, _wiring_sizes


Array = jax.Array
MODES = ("default", "no_gate", "pure")
ACTIVATIONS = ("lecun_tanh", "silu", "relu", "tanh", "gelu")


def lecun_tanh(x: Array) -> Array:
    """LeCun's scaled tanh, ``1.7159 * tanh(0.666 * x)`` (ncps' default backbone activation).

    LeCun, Bottou, Orr, Mueller, "Efficient BackProp" (1998), section 4.4.
    """
    return 1.7159 * jnp.tanh(0.666 * x)


_ACTIVATION_FNS: dict[str, Callable[[Array], Array]] = {
    "lecun_tanh": lecun_tanh,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch.nn.GELU's exact (erf) form
}


def _broadcast_ts(ts: Array | float, batch_size: int) -> Array:
    """Elapsed time as a scalar or a ``[B, 1]`` column that broadcasts over units."""
    ts = jnp.asarray(ts)
    if ts.ndim == 0:
        return ts
    if ts.shape == (batch_size,):
        return ts[:, None]
    raise ValueError(f"ts (the elapsed time) must be a scalar or have shape [B]=({batch_size},), "
                     f"got shape {tuple(ts.shape)}.")


def cfc_update(ff1: Array, ff2: Array, time_a: Array, time_b: Array, ts: Array | float, *, gated: bool = True) -> Array:
    """The CfC state update for modes ``default`` (``gated``) and ``no_gate``.

    With the pre-activations ``ff1 = W1 z + b1``, ``ff2 = W2 z + b2``,
    ``time_a = Wa z + ba`` and ``time_b = Wb z + bb`` of the backbone output
    ``z`` (Hasani et al. 2022: the models "CfC" and "CfC-noGate")::

        t  = sigmoid(time_a * ts + time_b)
        h' = tanh(ff1) * (1 - t) + t * tanh(ff2)      (default)
        h' = tanh(ff1) + t * tanh(ff2)                (no_gate)

    Args:
      ff1, ff2, time_a, time_b: ``[B, H]`` pre-activations.
      ts: elapsed time, a scalar or ``[B, 1]`` (anything broadcasting to ``[B, H]``).
      gated: ``True`` for mode ``default``, ``False`` for ``no_gate``.

    Returns:
      The new state ``h'``, ``[B, H]``.
    """
    f1 = jnp.tanh(ff1)
    f2 = jnp.tanh(ff2)
    t = jax.nn.sigmoid(time_a * ts + time_b)
    if gated:
        return f1 * (1.0 - t) + t * f2
    return f1 + t * f2


def cfc_pure_update(ff1: Array, w_tau: Array, a: Array, ts: Array | float) -> Array:
    """The direct closed-form approximation of the LTC solution, mode ``pure``.

    Hasani et al. 2022 (the model "Cf-S")::

        h' = -A * exp(-ts * (|w_tau| + |ff1|)) * ff1 + A

    ``ff1 = W1 z + b1`` enters without a tanh, as in ncps.

    Args:
      ff1: ``[B, H]`` pre-activation.
      w_tau, a: ``[H]`` time-constant and bias parameters.
      ts: elapsed time, a scalar or ``[B, 1]``.

    Returns:
      The new state ``h'``, ``[B, H]``.
    """
    return -a * jnp.exp(-ts * (jnp.abs(w_tau) + jnp.abs(ff1))) * ff1 + a


def lstm_update(z: Array, c: Array) -> tuple[Array, Array]:
    """The LSTM update of ncps' mixed-memory cell (forget-gate bias +1).

    With ``z = W_x x + b + W_h h`` split into four ``[B, H]`` blocks
    ``(i, ig, fg, og)`` in that order::

        c' = c * sigmoid(fg + 1) + tanh(i) * sigmoid(ig)
        h' = tanh(c') * sigmoid(og)

    Args:
      z: ``[B, 4H]`` gate pre-activations.
      c: ``[B, H]`` cell memory.

    Returns:
      ``(h', c')``, both ``[B, H]``.
    """
    i, ig, fg, og = jnp.split(z, 4, axis=-1)
    new_c = c * jax.nn.sigmoid(fg + 1.0) + jnp.tanh(i) * jax.nn.sigmoid(ig)
    new_h = jnp.tanh(new_c) * jax.nn.sigmoid(og)
    return new_h, new_c


class MixedMemoryState(NamedTuple):
    """State of a CfC with ``mixed_memory=True`` (the pair ncps calls ``(h, c)``).

    Attributes:
      h: ``[B, state_size]`` CfC state; the LSTM reads it as its output state.
      c: ``[B, state_size]`` LSTM cell memory.
    """

    h: Array
    c: Array


def reset_state(state: Any, reset: Array) -> Any:
    """Zero every leaf of ``state`` in the batch rows where ``reset`` is set.

    Args:
      state: a pytree whose leaves are ``[B, ...]`` arrays.
      reset: ``[B]`` bool (nonzero means reset).

    Returns:
      ``state`` with rows ``b`` where ``reset[b]`` replaced by exact zeros.
    """
    reset = jnp.asarray(reset).astype(bool)

    def _zero(leaf: Array) -> Array:
        mask = reset.reshape(reset.shape + (1,) * (leaf.ndim - 1))
        return jnp.where(mask, jnp.zeros_like(leaf), leaf)

    return jax.tree.map(_zero, state)


def zero_state(batch_size: int, state_size: int, *, mixed_memory: bool = False,
               dtype: Any = jnp.float32) -> Array | MixedMemoryState:
    """The all-zero initial state of a :class:`CfC`.

    Returns:
      ``[B, state_size]`` zeros, or ``MixedMemoryState(h, c)`` of two such
      arrays when ``mixed_memory``.
    """
    h = jnp.zeros((batch_size, state_size), dtype)
    if mixed_memory:
        return MixedMemoryState(h, jnp.zeros_like(h))
    return h


def _uniform_init(bound: float) -> Callable:
    """U(-bound, bound); ``torch.nn.Linear``'s default bias init has ``bound = 1/sqrt(fan_in)``."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _check_backbone(backbone_units: Any, backbone_layers: Any, backbone_dropout: Any) -> None:
    _check_int("backbone_layers", backbone_layers, 0)
    if backbone_layers > 0:
        _check_int("backbone_units", backbone_units, 1)
    if not 0.0 <= backbone_dropout < 1.0:
        raise ValueError(f"backbone_dropout must be in [0, 1), got {backbone_dropout!r}.")


_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class _Linear(nn.Module):
    """``y = x @ (kernel * mask) + bias`` with ``kernel`` ``[in, out]`` (torch's weight transposed)."""

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable | None = None  # None: torch's default U(+-1/sqrt(in))
    mask: _FrozenArray | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), jnp.float32)
        if self.mask is not None:
            kernel = kernel * jnp.asarray(self.mask.array, kernel.dtype)
        y = jnp.dot(x, kernel)
        if self.use_bias:
            init = self.bias_init or _uniform_init(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)
            y = y + self.param("bias", init, (self.features,), jnp.float32)
        return y


class CfCCell(nn.Module):
    """One closed-form continuous-time step (ncps' ``CfCCell``).

    Hasani et al., "Closed-form continuous-time neural networks", Nature
    Machine Intelligence 2022.  With ``z`` the backbone applied to
    ``concat(x, h)`` -- ``backbone_layers`` times Linear + activation, with
    dropout after the second and later layers when ``backbone_dropout > 0``
    (exactly where ncps puts it); ``z = concat(x, h)`` when
    ``backbone_layers == 0``::

        default:  h' = tanh(W1 z) * (1 - t) + t * tanh(W2 z),
                  t  = sigmoid((Wa z) * ts + Wb z)            (biases implied)
        no_gate:  h' = tanh(W1 z) + t * tanh(W2 z)
        pure:     h' = -A * exp(-ts * (|w_tau| + |W1 z|)) * (W1 z) + A

    Params (names follow ncps): ``backbone_{i}``, ``ff1``, and ``ff2``,
    ``time_a``, ``time_b`` (``default``/``no_gate``) or ``w_tau``, ``A``
    (``pure``, shape ``[H]``).  Init as ncps: xavier-uniform kernels (also
    ``w_tau``, ``A``, which ncps stores as ``[1, H]``), torch's default biases.

    Attributes:
      hidden_size: ``H``, the number of units.
      mode: ``"default"``, ``"no_gate"`` or ``"pure"``.
      backbone_units: width of each backbone layer.
      backbone_layers: number of backbone layers (0: no backbone).
      backbone_dropout: dropout rate after backbone layers 2.. (needs the
        ``"dropout"`` RNG when ``deterministic=False``).
      activation: ``"lecun_tanh"``, ``"silu"``, ``"relu"``, ``"tanh"``, ``"gelu"``.
      sparsity_mask: internal (set by :class:`WiredCfCCell`): a
        ``[F + H, H]`` 0/1 mask on the ``ff1``/``ff2`` kernels.
    """

    hidden_size: int
    mode: str = "default"
    backbone_units: int = 128
    backbone_layers: int = 1
    backbone_dropout: float = 0.0
    activation: str = "lecun_tanh"
    sparsity_mask: _FrozenArray | None = None

    def __post_init__(self):
        _check_int("hidden_size", self.hidden_size, 1)
        _check_choice("mode", self.mode, MODES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_backbone(self.backbone_units, self.backbone_layers, self.backbone_dropout)
        super().__post_init__()

    @nn.compact
    def __call__(self, h: Array, x: Array, ts: Array | float = 1.0, *,
                 deterministic: bool = True) -> tuple[Array, Array]:
        """One step: ``h [B, H]``, ``x [B, F]``, ``ts`` a scalar or ``[B]`` -> ``(h', h')`` (carry, output).

        ``deterministic=False`` enables backbone dropout.
        """
        if x.ndim != 2 or h.ndim != 2 or h.shape != (x.shape[0], self.hidden_size):
            raise ValueError(f"CfCCell expects x [B, F] and h [B, {self.hidden_size}], "
                             f"got x {tuple(x.shape)} and h {tuple(h.shape)}.")
        ts = _broadcast_ts(ts, x.shape[0])
        z = jnp.concatenate([x, h], axis=-1)
        act = _ACTIVATION_FNS[self.activation]
        for i in range(self.backbone_layers):
            z = act(_Linear(self.backbone_units, name=f"backbone_{i}")(z))
            if i >= 1 and self.backbone_dropout > 0.0:
                z = nn.Dropout(self.backbone_dropout)(z, deterministic=deterministic)
        ff1 = _Linear(self.hidden_size, mask=self.sparsity_mask, name="ff1")(z)
        if self.mode == "pure":
            bound = math.sqrt(6.0 / (self.hidden_size + 1))  # xavier-uniform of a [1, H] tensor
            w_tau = self.param("w_tau", _uniform_init(bound), (self.hidden_size,), jnp.float32)
            a = self.param("A", _uniform_init(bound), (self.hidden_size,), jnp.float32)
            new_h = cfc_pure_update(ff1, w_tau, a, ts)
        else:
            ff2 = _Linear(self.hidden_size, mask=self.sparsity_mask, name="ff2")(z)
            t_a = _Linear(self.hidden_size, name="time_a")(z)
            t_b = _Linear(self.hidden_size, name="time_b")(z)
            new_h = cfc_update(ff1, ff2, t_a, t_b, ts, gated=self.mode == "default")
        return new_h, new_h


class WiredCfCCell(nn.Module):
    """CfC layers stacked along a wiring (ncps' ``WiredCfCCell``).

    Layer ``l`` is a :class:`CfCCell` without backbone whose ``ff1``/``ff2``
    kernels are masked by ``concat(mask_l, ones[n_l, n_l])`` (``mask_l``:
    ``[in_l, n_l]`` from the wiring); layer 0 reads ``x``, layer ``l`` reads
    layer ``l - 1``'s new state.  The state is the layers' states
    concatenated in layer order; the output is the last (motor) layer's state.

    Params: ``layer_{l}`` for each layer, each as in :class:`CfCCell`.

    Attributes:
      wiring: an :class:`AutoNCP`, :class:`NCP` or :class:`LayeredWiring`.
      mode: ``"default"``, ``"no_gate"`` or ``"pure"``.
    """

    wiring: Any
    mode: str = "default"

    def __post_init__(self):
        _wiring_sizes(self.wiring)
        _check_choice("mode", self.mode, MODES)
        super().__post_init__()

    @nn.compact
    def __call__(self, h: Array, x: Array, ts: Array | float = 1.0, *,
                 deterministic: bool = True) -> tuple[Array, Array]:
        """One step: ``h [B, units]``, ``x [B, F]``, ``ts`` a scalar or ``[B]`` -> ``(h', y)``.

        ``y [B, output_size]`` is the last layer's new state; ``deterministic``
        is unused (no backbone, so no dropout).
        """
        sizes = self.wiring.layer_sizes
        if x.ndim != 2 or h.shape != (x.shape[0], sum(sizes)):
            raise ValueError(f"WiredCfCCell expects x [B, F] and h [B, {sum(sizes)}], "
                             f"got x {tuple(x.shape)} and h {tuple(h.shape)}.")
        layers = self.wiring.build(x.shape[-1])
        parts = jnp.split(h, np.cumsum(sizes)[:-1].tolist(), axis=-1)
        inputs = x
        new_states = []
        for l, (n, mask) in enumerate(zip(sizes, layers.masks)):
            mask = np.concatenate([mask, np.ones((n, n), np.float32)], axis=0)  # input synapses, then own state
            cell = CfCCell(n, mode=self.mode, backbone_layers=0, sparsity_mask=_FrozenArray(mask), name=f"layer_{l}")
            inputs, _ = cell(parts[l], inputs, ts, deterministic=deterministic)
            new_states.append(inputs)
        return jnp.concatenate(new_states, axis=-1), inputs


class MixedMemoryLSTMCell(nn.Module):
    """The LSTM of ncps' ``mixed_memory=True`` (see :func:`lstm_update`).

    ``z = x @ W_x + b + h @ W_h``; params ``input_map`` (kernel ``[F, 4H]``,
    bias; init xavier-uniform, U(-0.1, 0.1)) and ``recurrent_map`` (kernel
    ``[H, 4H]``, no bias; init orthogonal), as ncps' ``LSTMCell``.

    Attributes:
      hidden_size: ``H``.
    """

    hidden_size: int

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], x: Array) -> tuple[tuple[Array, Array], Array]:
        """``carry = (h, c)``, both ``[B, H]``; ``x [B, F]`` -> ``((h', c'), h')``."""
        h, c = carry
        z = _Linear(4 * self.hidden_size, bias_init=_uniform_init(0.1), name="input_map")(x)
        z = z + _Linear(4 * self.hidden_size, use_bias=False, kernel_init=nn.initializers.orthogonal(),
                        name="recurrent_map")(h)
        new_h, new_c = lstm_update(z, c)
        return (new_h, new_c), new_h


class CfC(nn.Module):
    """A CfC RNN over a time-major sequence (ncps' ``ncps.torch.CfC``).

    Hasani et al., "Closed-form continuous-time neural networks", Nature
    Machine Intelligence 2022.  For each step ``t`` (one ``nn.scan``)::

        state = 0 where reset[t]                   (every part of the state)
        (h, c) = LSTM(x[t], (h, c))                (mixed_memory only)
        h, y  = cell(h, x[t], ts=timespans[t])     (CfCCell or WiredCfCCell)
        out[t] = fc(y)                             (fc only with proj_size)

    Unlike ncps, inputs are time-major and ``timespans`` has one value per
    step and batch element (ncps broadcasts a ``[B]`` timespan over units,
    which only does the intended thing for B == 1).

    Params: ``rnn_cell`` (:class:`CfCCell` or :class:`WiredCfCCell`),
    ``lstm`` (mixed memory), ``fc`` (``proj_size``), named as ncps names them;
    see :func:`params_from_ncps`.

    Attributes:
      hidden_size: number of CfC units (the state size); may be None with a
        wiring (it is then ``wiring`` units) and must match it otherwise.
      proj_size: if set, a linear readout to ``proj_size`` features.
      mode: ``"default"``, ``"no_gate"`` or ``"pure"``.
      backbone_units: backbone width (default 128); not allowed with a wiring.
      backbone_layers: backbone depth (default 1; 0 = no backbone); not allowed with a wiring.
      backbone_dropout: backbone dropout rate (default 0); not allowed with a wiring.
      activation: backbone activation, one of ``ACTIVATIONS``.
      mixed_memory: put an LSTM (:class:`MixedMemoryLSTMCell`) before the CfC
        (the paper's "CfC-mmRNN").
      wiring: an :class:`AutoNCP`, :class:`NCP` or :class:`LayeredWiring`
        to use a :class:`WiredCfCCell` (output = motor neurons).
      return_sequences: return every step's output ``[T, B, D]``, or only
        the last one ``[B, D]``.
    """

    hidden_size: int | None = None
    proj_size: int | None = None
    mode: str = "default"
    backbone_units: int | None = None
    backbone_layers: int | None = None
    backbone_dropout: float | None = None
    activation: str = "lecun_tanh"
    mixed_memory: bool = False
    wiring: Any = None
    return_sequences: bool = True

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.proj_size is not None:
            _check_int("proj_size", self.proj_size, 1)
        if self.wiring is not None:
            sizes = _wiring_sizes(self.wiring)
            for name in ("backbone_units", "backbone_layers", "backbone_dropout"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} cannot be used with a wiring "
                                     f"(wired CfC layers have no backbone); leave it None.")
            if self.hidden_size is not None and self.hidden_size != sum(sizes):
                raise ValueError(f"hidden_size={self.hidden_size} does not match the wiring's {sum(sizes)} "
                                 f"units; pass hidden_size=None or {sum(sizes)}.")
        else:
            if self.hidden_size is None:
                raise ValueError("CfC needs hidden_size (an integer >= 1) or a wiring, got neither.")
            _check_int("hidden_size", self.hidden_size, 1)
            _check_backbone(**self._backbone)
        super().__post_init__()

    @property
    def _backbone(self) -> dict[str, Any]:
        """The backbone arguments of the :class:`CfCCell`, ``None`` replaced by the defaults."""
        defaults = {"backbone_units": 128, "backbone_layers": 1, "backbone_dropout": 0.0}
        return {k: d if getattr(self, k) is None else getattr(self, k) for k, d in defaults.items()}

    @property
    def state_size(self) -> int:
        """Size of ``h`` (and of ``c`` with mixed memory)."""
        return self.hidden_size if self.wiring is None else sum(self.wiring.layer_sizes)

    @property
    def output_size(self) -> int:
        """Feature size of the outputs: ``proj_size``, else the cell's output size."""
        if self.proj_size is not None:
            return self.proj_size
        return self.hidden_size if self.wiring is None else self.wiring.layer_sizes[-1]

    def initialize_carry(self, batch_size: int, dtype: Any = jnp.float32) -> Array | MixedMemoryState:
        """The zero state for ``batch_size`` sequences (see :func:`zero_state`)."""
        return zero_state(batch_size, self.state_size, mixed_memory=self.mixed_memory, dtype=dtype)

    def setup(self):
        if self.wiring is not None:
            self.rnn_cell = WiredCfCCell(self.wiring, mode=self.mode)
        else:
            self.rnn_cell = CfCCell(self.hidden_size, mode=self.mode, activation=self.activation, **self._backbone)
        if self.mixed_memory:
            self.lstm = MixedMemoryLSTMCell(self.state_size)
        if self.proj_size is not None:
            self.fc = _Linear(self.proj_size, kernel_init=_torch_kernel_init)

    def __call__(self, x: Array, initial_state: Array | MixedMemoryState | None = None, reset: Array | None = None,
                 timespans: Array | float | None = None, *,
                 deterministic: bool = True) -> tuple[Array, Array | MixedMemoryState]:
        """Run the CfC over a sequence.

        Args:
          x: ``[T, B, F]`` inputs.
          initial_state: state before step 0 (``[B, state_size]``, or
            ``MixedMemoryState``/``(h, c)`` with mixed memory); None: zeros.
          reset: ``[T, B]`` bool; where set, the whole state (LSTM memory
            included) is zeroed before step ``t`` -- set it where an episode
            starts, e.g. ``reset[t] = done[t - 1]``.  None: never.
          timespans: elapsed time per step, ``[T, B]`` or a scalar; None: 1.0.
          deterministic: disables backbone dropout; with
            ``deterministic=False`` and dropout, pass ``rngs={"dropout": key}``.

        Returns:
          ``(outputs, final_state)``: outputs ``[T, B, output_size]`` (or
          ``[B, output_size]``, the last step, if not ``return_sequences``)
          and the state after the last step (``[B, state_size]``, or a
          ``MixedMemoryState`` with mixed memory).
        """
        x = jnp.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"CfC expects time-major inputs x [T, B, F], got shape {tuple(x.shape)}.")
        t_len, batch = x.shape[:2]
        if initial_state is None:
            state = self.initialize_carry(batch, x.dtype)
        else:
            state = self._check_state(initial_state, batch)
        if reset is not None:
            reset = jnp.asarray(reset)
            if reset.shape != (t_len, batch):
                raise ValueError(f"reset must have shape [T, B]=({t_len}, {batch}), got {tuple(reset.shape)}.")
            reset = reset.astype(bool)
        ts_const, ts_seq = 1.0, None
        if timespans is not None:
            timespans = jnp.asarray(timespans, x.dtype)
            if timespans.ndim == 0:
                ts_const = timespans
            elif timespans.shape == (t_len, batch):
                ts_seq = timespans
            else:
                raise ValueError(f"timespans must be a scalar or have shape [T, B]=({t_len}, {batch}), "
                                 f"got {tuple(timespans.shape)}.")

        def step(mdl: CfC, carry, xs):
            x_t, reset_t, ts_t = xs
            if reset_t is not None:
                carry = reset_state(carry, reset_t)
            ts = ts_const if ts_t is None else ts_t
            if mdl.mixed_memory:
                (h, c), _ = mdl.lstm((carry.h, carry.c), x_t)
                h, y = mdl.rnn_cell(h, x_t, ts, deterministic=deterministic)
                carry = MixedMemoryState(h, c)
            else:
                carry, y = mdl.rnn_cell(carry, x_t, ts, deterministic=deterministic)
            return carry, y

        scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False, "dropout": True})
        final_state, ys = scan(self, state, (x, reset, ts_seq))
        if not self.return_sequences:
            ys = ys[-1]
        if self.proj_size is not None:
            ys = self.fc(ys)
        return ys, final_state

    def _check_state(self, state: Any, batch: int) -> Array | MixedMemoryState:
        shape = (batch, self.state_size)
        if self.mixed_memory:
            if not (isinstance(state, tuple) and len(state) == 2):
                raise ValueError("With mixed_memory=True the state must be MixedMemoryState(h, c) (or a pair "
                                 f"(h, c)) of [B, {self.state_size}] arrays, got {type(state).__name__}.")
            h, c = (jnp.asarray(s) for s in state)
            if h.shape != shape or c.shape != shape:
                raise ValueError(f"initial_state (h, c) must both have shape {shape}, got {tuple(h.shape)} "
                                 f"and {tuple(c.shape)}.")
            return MixedMemoryState(h, c)
        if isinstance(state, tuple):
            raise ValueError(f"With mixed_memory=False the state is one [B, {self.state_size}] array, got a tuple.")
        state = jnp.asarray(state)
        if state.shape != shape:
            raise ValueError(f"initial_state must have shape {shape}, got {tuple(state.shape)}.")
        return state
