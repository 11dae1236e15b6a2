"""``ncps.torch.CfC`` weights as :class:`jaxatari.networks.cfc.CfC` params.

:func:`params_from_ncps` converts the ``state_dict()`` of an ``ncps.torch.CfC``
(ncps 1.0.1), plain or wired, with or without mixed memory; given the same
weights, inputs and elapsed times the two networks agree to float32 rounding
(``tests/networks/test_cfc.py``). :func:`wiring_from_ncps` recovers a wired
network's layers from its masks. Nothing here imports torch: the tensors only
need ``numpy()`` or ``__array__``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from jaxatari.networks.wirings import LayeredWiring, Wiring, _wiring_sizes


_CELL_LINEARS = ("ff1", "ff2", "time_a", "time_b")


def _convert_cell(sd: dict[str, np.ndarray], prefix: str, used: set[str], *, allow_backbone: bool) -> dict:
    """Params of one ncps ``CfCCell`` whose keys start with ``prefix``."""

    def take(key: str) -> np.ndarray:
        used.add(key)
        return sd[key]

    def linear(name: str) -> dict:
        w, b = f"{prefix}{name}.weight", f"{prefix}{name}.bias"
        for key in (w, b):
            if key not in sd:
                raise ValueError(f"params_from_ncps: missing key {key!r}.")
        return {"kernel": take(w).T.copy(), "bias": take(b).copy()}

    params: dict[str, Any] = {}
    if allow_backbone:
        # nn.Sequential indices: Linear, act, [Dropout], Linear, act, ...; the
        # Linears in index order are backbone_0, backbone_1, ...
        pattern = re.compile(re.escape(prefix) + r"backbone\.(\d+)\.weight$")
        indices = sorted(int(m.group(1)) for k in sd if (m := pattern.match(k)))
        for i, idx in enumerate(indices):
            params[f"backbone_{i}"] = linear(f"backbone.{idx}")
    params["ff1"] = linear("ff1")
    pure = f"{prefix}w_tau" in sd
    if pure:
        for name in ("w_tau", "A"):
            key = f"{prefix}{name}"
            if key not in sd:
                raise ValueError(f"params_from_ncps: missing key {key!r} (mode 'pure').")
            params[name] = take(key).reshape(-1).copy()
    else:
        for name in _CELL_LINEARS[1:]:
            params[name] = linear(name)
    return params


def _load_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"params_from_ncps expects a mapping of names to arrays, got {type(state_dict).__name__}.")
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):  # a torch tensor, if torch happens to be around
            v = v.detach().cpu().numpy()
        out[str(k)] = np.asarray(v, dtype=np.float32)
    return out


def _ncps_masks(sd: dict[str, np.ndarray]) -> list[np.ndarray]:
    pattern = re.compile(r"rnn_cell\.layer_(\d+)\.sparsity_mask$")
    found = {int(m.group(1)): sd[k] for k in sd if (m := pattern.match(k))}
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"params_from_ncps: non-contiguous wired layers {sorted(found)}.")
    return [found[l] for l in range(len(found))]


def wiring_from_ncps(state_dict: Mapping[str, Any]) -> LayeredWiring:
    """The wiring of a wired ``ncps.torch.CfC``, read from its sparsity masks.

    Works for any ncps wiring (``AutoNCP``, ``NCP``, ``FullyConnected``,
    ``Random``): ncps stores each layer's mask ``[n_l, in_l + n_l]``, whose
    first ``in_l`` columns (transposed) are our ``[in_l, n_l]`` layer mask.

    Args:
      state_dict: ``ncps.torch.CfC(...).state_dict()``, values as arrays.

    Returns:
      A :class:`LayeredWiring` to pass as ``CfC(wiring=...)``.
    """
    sd = _load_state_dict(state_dict)
    masks = _ncps_masks(sd)
    if not masks:
        raise ValueError("wiring_from_ncps: no 'rnn_cell.layer_<l>.sparsity_mask' keys; the CfC is not wired.")
    layers = []
    for l, m in enumerate(masks):
        n = m.shape[0]
        if m.ndim != 2 or m.shape[1] <= n:
            raise ValueError(f"wiring_from_ncps: layer {l} mask has unexpected shape {m.shape}.")
        layers.append(m[:, : m.shape[1] - n].T)
    return LayeredWiring(layers)


def params_from_ncps(state_dict: Mapping[str, Any], *, wiring: Wiring | None = None) -> dict:
    """Convert an ``ncps.torch.CfC``'s weights into params for :class:`CfC`.

    Handles every configuration of ``ncps.torch.CfC``: modes, any number of
    backbone layers (with or without dropout), ``proj_size``,
    ``mixed_memory`` and wirings.  Torch ``Linear`` weights ``[out, in]``
    become Flax kernels ``[in, out]``; ``w_tau``/``A`` ``[1, H]`` become
    ``[H]``.  The wired cells' ``sparsity_mask`` buffers are not params (our
    masks come from ``CfC(wiring=...)``); pass ``wiring=`` to check that they
    match, or build the module with ``wiring=wiring_from_ncps(state_dict)``.

    Only the weights are converted: ncps' CfC is batch-first by default,
    ours is time-major, so transpose the inputs ``[B, T, F] -> [T, B, F]``.

    Args:
      state_dict: ``model.state_dict()`` with values as NumPy arrays (torch
        tensors are accepted too); torch itself is not needed.
      wiring: optional wiring the Flax module will use; checked against the
        sparsity masks in ``state_dict``.

    Returns:
      The ``"params"`` collection: use ``model.apply({"params": params}, x)``
      with a :class:`CfC` of the same configuration.

    Raises:
      ValueError: on keys this conversion does not know (all named), missing
        keys, or masks that differ from ``wiring``.
    """
    sd = _load_state_dict(state_dict)
    used: set[str] = set()
    params: dict[str, Any] = {}
    masks = _ncps_masks(sd)
    if masks:
        cell: dict[str, Any] = {}
        for l in range(len(masks)):
            used.add(f"rnn_cell.layer_{l}.sparsity_mask")
            cell[f"layer_{l}"] = _convert_cell(sd, f"rnn_cell.layer_{l}.", used, allow_backbone=False)
        params["rnn_cell"] = cell
        if wiring is not None:
            theirs = wiring_from_ncps(sd)
            _wiring_sizes(wiring)
            try:
                ours = wiring.build(theirs.input_size)
            except ValueError as e:
                raise ValueError(f"params_from_ncps: the given wiring does not fit the state_dict: {e}") from e
            if ours != theirs:
                raise ValueError(
                    f"params_from_ncps: the sparsity masks in state_dict ({theirs!r}) differ from "
                    f"wiring={wiring!r}; build the CfC with wiring=wiring_from_ncps(state_dict)."
                )
    else:
        if wiring is not None:
            raise ValueError("params_from_ncps: wiring was given but the state_dict has no wired layers.")
        if not any(k.startswith("rnn_cell.") for k in sd):
            raise ValueError(
                f"params_from_ncps: no 'rnn_cell.*' keys; is this an ncps.torch.CfC state_dict? Keys: {sorted(sd)}."
            )
        params["rnn_cell"] = _convert_cell(sd, "rnn_cell.", used, allow_backbone=True)
    if "lstm.input_map.weight" in sd:
        for key in ("lstm.input_map.weight", "lstm.input_map.bias", "lstm.recurrent_map.weight"):
            if key not in sd:
                raise ValueError(f"params_from_ncps: missing key {key!r} (mixed memory).")
            used.add(key)
        params["lstm"] = {
            "input_map": {
                "kernel": sd["lstm.input_map.weight"].T.copy(),
                "bias": sd["lstm.input_map.bias"].copy(),
            },
            "recurrent_map": {"kernel": sd["lstm.recurrent_map.weight"].T.copy()},
        }
    if "fc.weight" in sd:
        if "fc.bias" not in sd:
            raise ValueError("params_from_ncps: missing key 'fc.bias'.")
        used.update(("fc.weight", "fc.bias"))
        params["fc"] = {"kernel": sd["fc.weight"].T.copy(), "bias": sd["fc.bias"].copy()}
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(
            f"params_from_ncps: unsupported keys {unknown}; expected ncps.torch.CfC keys "
            "(rnn_cell.*, lstm.*, fc.*)."
        )
    return params
