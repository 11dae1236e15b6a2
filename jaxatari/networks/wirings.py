"""Neural circuit policy wirings for :class:`jaxatari.networks.cfc.CfC`.

:class:`NCP` and :class:`AutoNCP` draw the same random synapses as
``ncps.wirings.NCP``/``AutoNCP`` for the same seed (Lechner et al., "Neural
circuit policies enabling auditable autonomy", Nature Machine Intelligence
2020); :class:`LayeredWiring` is any stack of layer masks; :func:`ncp_adjacency`
gives a wiring's sensory and neuron adjacency matrices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {list(allowed)}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


class _ByKey:
    """Equality and hash by ``self._key`` (Flax module fields must be hashable)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)


class _FrozenArray(_ByKey):
    """A read-only float32 array that is hashable and compares by value."""

    __slots__ = ("array", "_key")

    def __init__(self, array: Any):
        self.array = np.array(array, dtype=np.float32)
        self.array.setflags(write=False)
        self._key = (self.array.shape, self.array.tobytes())

    def __repr__(self) -> str:
        return f"_FrozenArray(shape={self.array.shape})"


class LayeredWiring(_ByKey):
    """An explicit layered wiring: the input connectivity of each CfC layer.

    Layer ``l`` has ``n_l`` neurons; it reads the network input (``l == 0``)
    or layer ``l - 1``'s state through ``masks[l]``, a 0/1 array of shape
    ``[in_l, n_l]``, and its own state densely.  The last layer's state is the
    output (for an NCP: the motor neurons).  Made by :meth:`NCP.build`,
    :meth:`AutoNCP.build` or :func:`wiring_from_ncps`.

    Args:
      masks: per-layer ``[in_l, n_l]`` masks; nonzero entries are synapses
        (ncps' polarities are folded to 1 as ncps' ``WiredCfCCell`` does).
    """

    def __init__(self, masks: Sequence[Any]):
        if len(masks) == 0:
            raise ValueError("LayeredWiring needs at least one layer mask, got none.")
        frozen = []
        for l, m in enumerate(masks):
            arr = np.abs(np.asarray(m, dtype=np.float32))
            if arr.ndim != 2 or arr.shape[1] == 0:
                raise ValueError(f"LayeredWiring mask {l} must be a [in, neurons] matrix, got shape {arr.shape}.")
            if l > 0 and arr.shape[0] != frozen[-1].array.shape[1]:
                raise ValueError(f"LayeredWiring mask {l} has {arr.shape[0]} input rows but layer {l - 1} "
                                 f"has {frozen[-1].array.shape[1]} neurons.")
            frozen.append(_FrozenArray((arr != 0).astype(np.float32)))
        self._masks = tuple(frozen)

    _key = property(lambda self: self._masks)

    @property
    def masks(self) -> tuple[np.ndarray, ...]:
        """Per-layer read-only ``[in_l, n_l]`` float32 0/1 masks."""
        return tuple(m.array for m in self._masks)

    @property
    def input_size(self) -> int:
        return int(self._masks[0].array.shape[0])

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return tuple(int(m.array.shape[1]) for m in self._masks)

    @property
    def units(self) -> int:
        """Total number of neurons (the CfC state size)."""
        return sum(self.layer_sizes)

    @property
    def output_size(self) -> int:
        """Neurons of the last layer (the wired cell's output size)."""
        return self.layer_sizes[-1]

    def build(self, input_size: int) -> LayeredWiring:
        """Return ``self`` after checking that ``input_size`` is the one it was made for."""
        if input_size != self.input_size:
            raise ValueError(f"This LayeredWiring was built for {self.input_size} input features, "
                             f"got inputs with {input_size}.")
        return self

    def __repr__(self) -> str:
        return f"LayeredWiring(input_size={self.input_size}, layer_sizes={self.layer_sizes})"


@dataclasses.dataclass(frozen=True)
class NCP:
    """A neural circuit policy wiring: sensory -> inter -> command -> motor.

    Lechner, Hasani, Amini, Henzinger, Rus, Grosu, "Neural circuit policies
    enabling auditable autonomy", Nature Machine Intelligence 2, 642-652 (2020).

    Reproduces ``ncps.wirings.NCP``: neuron ids are ``[motor | command |
    inter]``, and :meth:`build` draws the synapses (and their polarities) with
    ``numpy.random.RandomState(seed)`` in ncps' order, so the masks are
    identical to ncps' for the same arguments and input size.
    """

    inter_neurons: int
    """Number of inter neurons (layer 0, fed by the inputs)."""
    command_neurons: int
    """Number of command neurons (layer 1)."""
    motor_neurons: int
    """Number of motor neurons (layer 2 = the outputs)."""
    sensory_fanout: int
    """Synapses from each input feature to the inter neurons."""
    inter_fanout: int
    """Synapses from each inter neuron to the command neurons."""
    recurrent_command_synapses: int
    """Command -> command synapses (drawn for ncps' RNG stream; a CfC layer's own state is read densely)."""
    motor_fanin: int
    """Synapses from the command neurons into each motor neuron."""
    seed: int = 22222
    """Seed of the ``numpy.random.RandomState`` that draws the synapses."""

    def __post_init__(self):
        for name in ("inter_neurons", "command_neurons", "motor_neurons", "sensory_fanout", "inter_fanout",
                     "motor_fanin"):
            _check_int(name, getattr(self, name), 1)
        _check_int("recurrent_command_synapses", self.recurrent_command_synapses, 0)
        for name, limit in (("motor_fanin", "command_neurons"), ("sensory_fanout", "inter_neurons"),
                            ("inter_fanout", "command_neurons")):
            if getattr(self, name) > getattr(self, limit):
                raise ValueError(f"{name}={getattr(self, name)} exceeds {limit}={getattr(self, limit)}.")

    @property
    def units(self) -> int:
        """Total number of neurons (the CfC state size)."""
        return self.inter_neurons + self.command_neurons + self.motor_neurons

    @property
    def output_size(self) -> int:
        return self.motor_neurons

    @property
    def layer_sizes(self) -> tuple[int, int, int]:
        """``(inter, command, motor)``: the layer order of the state vector."""
        return (self.inter_neurons, self.command_neurons, self.motor_neurons)

    def build(self, input_size: int) -> LayeredWiring:
        """Per-layer input masks for ``input_size`` input features (cached)."""
        _check_int("input_size", input_size, 1)
        return _ncp_layers(self, int(input_size))


@dataclasses.dataclass(frozen=True)
class AutoNCP:
    """An :class:`NCP` sized from a neuron budget, as ``ncps.wirings.AutoNCP``.

    With ``d = 1 - sparsity_level`` and ``n = units - output_size``:
    ``command = max(int(0.4 n), 1)``, ``inter = n - command``,
    ``sensory_fanout = max(int(inter d), 1)``,
    ``inter_fanout = motor_fanin = max(int(command d), 1)``,
    ``recurrent_command_synapses = max(int(2 command d), 1)``.
    """

    units: int
    """Total number of neurons (the CfC state size)."""
    output_size: int
    """Motor neurons (outputs); must be < units - 2."""
    sparsity_level: float = 0.5
    """In [0.1, 1.0]; higher is sparser."""
    seed: int = 22222
    """Seed of the ``numpy.random.RandomState`` that draws the synapses."""

    def __post_init__(self):
        _check_int("units", self.units, 4)
        _check_int("output_size", self.output_size, 1)
        if self.output_size >= self.units - 2:
            raise ValueError(f"AutoNCP output_size must be < units - 2, got output_size={self.output_size} "
                             f"with units={self.units}.")
        if not 0.1 <= self.sparsity_level <= 1.0:
            raise ValueError(f"AutoNCP sparsity_level must be in [0.1, 1.0], got {self.sparsity_level!r}.")

    @property
    def ncp(self) -> NCP:
        """The equivalent explicit :class:`NCP`."""
        density = 1.0 - self.sparsity_level
        inter_and_command = self.units - self.output_size
        command = max(int(0.4 * inter_and_command), 1)
        inter = inter_and_command - command
        fan = max(int(command * density), 1)
        return NCP(inter_neurons=inter, command_neurons=command, motor_neurons=self.output_size,
                   sensory_fanout=max(int(inter * density), 1), inter_fanout=fan, motor_fanin=fan,
                   recurrent_command_synapses=max(int(command * density * 2), 1), seed=self.seed)

    @property
    def layer_sizes(self) -> tuple[int, int, int]:
        """``(inter, command, motor)``: the layer order of the state vector."""
        return self.ncp.layer_sizes

    def build(self, input_size: int) -> LayeredWiring:
        """Per-layer input masks for ``input_size`` input features (cached)."""
        return self.ncp.build(input_size)


Wiring = NCP | AutoNCP | LayeredWiring


def ncp_adjacency(wiring: NCP | AutoNCP, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The signed adjacency matrices of an NCP, identical to ncps' after ``build``.

    Args:
      wiring: an :class:`NCP` or :class:`AutoNCP`.
      input_size: number of input (sensory) features.

    Returns:
      ``(sensory_adjacency [input_size, units], adjacency [units, units])``,
      int32 with entries in {-1, 0, 1}; ``[src, dest]`` is the synapse
      polarity.  Equal to ncps' ``sensory_adjacency_matrix`` and
      ``adjacency_matrix``.
    """
    ncp = wiring.ncp if isinstance(wiring, AutoNCP) else wiring
    if not isinstance(ncp, NCP):
        raise ValueError(f"ncp_adjacency needs an NCP or AutoNCP wiring, got {wiring!r}.")
    _check_int("input_size", input_size, 1)
    return tuple(a.copy() for a in _ncp_adjacency_cached(ncp, int(input_size)))


@functools.lru_cache(maxsize=64)
def _ncp_adjacency_cached(ncp: NCP, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    # Every RandomState call (polarities included) mirrors ncps' NCP.build, so the synapses are identical.
    rng = np.random.RandomState(ncp.seed)
    n_motor, n_command, n_inter = ncp.motor_neurons, ncp.command_neurons, ncp.inter_neurons
    motor = list(range(0, n_motor))
    command = list(range(n_motor, n_motor + n_command))
    inter = list(range(n_motor + n_command, n_motor + n_command + n_inter))
    sensory = list(range(input_size))
    sens = np.zeros((input_size, ncp.units), np.int32)
    adj = np.zeros((ncp.units, ncp.units), np.int32)

    def fan_out(matrix, sources, targets, fanout, fill_limit):
        # Each source connects to `fanout` distinct targets; targets left
        # without input then get int(len(sources) * fanout / len(targets))
        # sources (clipped to [1, fill_limit]).
        unreached = list(targets)
        for src in sources:
            for dest in rng.choice(targets, size=fanout, replace=False):
                if dest in unreached:
                    unreached.remove(dest)
                matrix[src, dest] = rng.choice([-1, 1])
        fanin = int(np.clip(int(len(sources) * fanout / len(targets)), 1, fill_limit))
        for dest in unreached:
            for src in rng.choice(sources, size=fanin, replace=False):
                matrix[src, dest] = rng.choice([-1, 1])

    # sensory -> inter, inter -> command (ncps clips the refill of command
    # neurons by the number of command neurons, not inter neurons).
    fan_out(sens, sensory, inter, ncp.sensory_fanout, input_size)
    fan_out(adj, inter, command, ncp.inter_fanout, n_command)
    for _ in range(ncp.recurrent_command_synapses):
        src = rng.choice(command)
        dest = rng.choice(command)
        adj[src, dest] = rng.choice([-1, 1])
    # command -> motor is fan_out transposed: each motor neuron draws
    # `motor_fanin` command neurons, then command neurons left without a
    # synapse get some motor targets.
    fan_out(adj.T, motor, command, ncp.motor_fanin, n_motor)
    sens.setflags(write=False)
    adj.setflags(write=False)
    return sens, adj


@functools.lru_cache(maxsize=64)
def _ncp_layers(ncp: NCP, input_size: int) -> LayeredWiring:
    sens, adj = _ncp_adjacency_cached(ncp, input_size)
    m, c = ncp.motor_neurons, ncp.command_neurons
    motor, command, inter = slice(0, m), slice(m, m + c), slice(m + c, ncp.units)
    return LayeredWiring([np.abs(sens[:, inter]), np.abs(adj[inter, command]), np.abs(adj[command, motor])])


def _wiring_sizes(wiring: Any) -> tuple[int, ...]:
    if not isinstance(wiring, Wiring):
        raise ValueError(f"wiring must be an AutoNCP, NCP or LayeredWiring, got {type(wiring).__name__}: {wiring!r}.")
    return wiring.layer_sizes
