"""``ncps.torch.CfC`` (ncps 1.0.1) weights as :class:`jaxatari.networks.cfc.CfC` params.

:func:`params_from_ncps` converts a ``state_dict()``, plain or wired, with or
without mixed memory; :func:`wiring_from_ncps` recovers a wired network's
layers from its masks. Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxatari.networks.wirings import LayeredWiring, Wiring, _wiring_sizes


class _Reader:
    """Reads converted entries of a state_dict, remembering which keys it used."""

    def __init__(self, sd: dict[str, np.ndarray]):
        self.sd, self.used = sd, set()

    def take(self, key: str, note: str = "") -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"params_from_ncps: missing key {key!r}{note}.")
        self.used.add(key)
        return self.sd[key]

    def linear(self, name: str, note: str = "", *, bias: bool = True) -> dict:
        """A torch ``Linear`` ``name``: weight ``[out, in]`` -> kernel ``[in, out]``."""
        params = {"kernel": self.take(f"{name}.weight", note).T.copy()}
        if bias:
            params["bias"] = self.take(f"{name}.bias", note)
        return params

    def cell(self, prefix: str, *, allow_backbone: bool) -> dict:
        """Params of one ncps ``CfCCell`` whose keys start with ``prefix``."""
        params: dict[str, Any] = {}
        if allow_backbone:
            # nn.Sequential indices: Linear, act, [Dropout], Linear, act, ...; the
            # Linears in index order are backbone_0, backbone_1, ...
            pattern = re.compile(re.escape(prefix) + r"backbone\.(\d+)\.weight$")
            indices = sorted(int(m.group(1)) for k in self.sd if (m := pattern.match(k)))
            for i, idx in enumerate(indices):
                params[f"backbone_{i}"] = self.linear(f"{prefix}backbone.{idx}")
        params["ff1"] = self.linear(f"{prefix}ff1")
        if f"{prefix}w_tau" in self.sd:  # mode "pure"
            for name in ("w_tau", "A"):
                params[name] = self.take(f"{prefix}{name}", " (mode 'pure')").reshape(-1)
        else:
            for name in ("ff2", "time_a", "time_b"):
                params[name] = self.linear(f"{prefix}{name}")
        return params


def _load_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"params_from_ncps expects a mapping of names to arrays, got {type(state_dict).__name__}.")
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):  # a torch tensor, if torch happens to be around
            v = v.detach().cpu().numpy()
        out[str(k)] = np.array(v, dtype=np.float32)  # a copy: params never alias the caller's arrays
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

    Handles every configuration: modes, any backbone depth (with or without
    dropout), ``proj_size``, ``mixed_memory`` and wirings.  Torch ``Linear``
    weights ``[out, in]`` become Flax kernels ``[in, out]``; ``w_tau``/``A``
    ``[1, H]`` become ``[H]``.  The wired cells' ``sparsity_mask`` buffers are
    not params (our masks come from ``CfC(wiring=...)``).  ncps' CfC is
    batch-first by default, ours time-major: transpose inputs ``[B, T, F] ->
    [T, B, F]``.

    Args:
      state_dict: ``model.state_dict()``, values as NumPy arrays or torch tensors.
      wiring: optional wiring the Flax module will use; checked against the
        sparsity masks in ``state_dict`` (or use ``wiring_from_ncps(state_dict)``).

    Returns:
      The ``"params"`` collection: use ``model.apply({"params": params}, x)``
      with a :class:`CfC` of the same configuration.

    Raises:
      ValueError: on keys this conversion does not know (all named), missing
        keys, or masks that differ from ``wiring``.
    """
    sd = _load_state_dict(state_dict)
    reader = _Reader(sd)
    params: dict[str, Any] = {}
    masks = _ncps_masks(sd)
    if masks:
        reader.used.update(f"rnn_cell.layer_{l}.sparsity_mask" for l in range(len(masks)))
        params["rnn_cell"] = {
            f"layer_{l}": reader.cell(f"rnn_cell.layer_{l}.", allow_backbone=False) for l in range(len(masks))
        }
        if wiring is not None:
            theirs = wiring_from_ncps(sd)
            _wiring_sizes(wiring)
            try:
                ours = wiring.build(theirs.input_size)
            except ValueError as e:
                raise ValueError(f"params_from_ncps: the given wiring does not fit the state_dict: {e}") from e
            if ours != theirs:
                raise ValueError(f"params_from_ncps: the sparsity masks in state_dict ({theirs!r}) differ from "
                                 f"wiring={wiring!r}; build the CfC with wiring=wiring_from_ncps(state_dict).")
    else:
        if wiring is not None:
            raise ValueError("params_from_ncps: wiring was given but the state_dict has no wired layers.")
        if not any(k.startswith("rnn_cell.") for k in sd):
            raise ValueError(
                f"params_from_ncps: no 'rnn_cell.*' keys; is this an ncps.torch.CfC state_dict? Keys: {sorted(sd)}."
            )
        params["rnn_cell"] = reader.cell("rnn_cell.", allow_backbone=True)
    if "lstm.input_map.weight" in sd:
        params["lstm"] = {
            "input_map": reader.linear("lstm.input_map", " (mixed memory)"),
            "recurrent_map": reader.linear("lstm.recurrent_map", " (mixed memory)", bias=False),
        }
    if "fc.weight" in sd:
        params["fc"] = reader.linear("fc")
    unknown = sorted(set(sd) - reader.used)
    if unknown:
        raise ValueError(f"params_from_ncps: unsupported keys {unknown}; expected ncps.torch.CfC keys "
                         "(rnn_cell.*, lstm.*, fc.*).")
    return params
