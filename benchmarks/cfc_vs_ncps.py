"""Time jaxatari's Flax CfC against ncps' PyTorch CfC on the same weights and inputs.

For each model variant (plain CfC, CfC with mixed memory, CfC wired with an
AutoNCP) and size, both implementations get the weights of one
``ncps.torch.CfC`` (ours through ``params_from_ncps``) and the same inputs;
the script checks their outputs agree, then times

* forward: ours ``jax.jit(model.apply)``, ncps under ``torch.no_grad()``;
* forward + backward: the gradient of ``mean(outputs**2)`` with respect to
  all weights (ours ``jax.jit(jax.grad(...))``, ncps ``loss.backward()``).

Every timing is the median over ``--repeats`` calls after ``--warmup`` calls
(so after compilation for JAX), each ending in ``block_until_ready``.
Results go to ``benchmarks/results/cfc_vs_ncps.{json,md}`` with a description
of the machine.

    python benchmarks/cfc_vs_ncps.py                      # T=128, B=8, 256 inputs, 64 units
    python benchmarks/cfc_vs_ncps.py --batch-sizes 8 64 --seq-len 64

Needs the ``ncps`` extra (``pip install -e ".[ncps]"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from jaxatari.networks import cfc, ncps_weights
from jaxatari.networks import wirings as nw

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark settings."""

    seq_len: int = 128
    """Sequence length T."""
    batch_sizes: tuple[int, ...] = (8, 64)
    """Batch sizes B to time (the first is the headline size)."""
    input_size: int = 256
    """Input features F."""
    units: int = 64
    """CfC units (state size)."""
    backbone_units: int = 128
    """Backbone width (unwired variants)."""
    variants: tuple[str, ...] = ("plain", "mixed_memory", "autoncp")
    """Model variants: plain, mixed_memory, autoncp (AutoNCP(units, 8) wiring)."""
    repeats: int = 15
    """Timed calls per measurement; the median is reported."""
    warmup: int = 3
    """Untimed calls before timing (includes JAX compilation)."""
    seed: int = 0
    """Seed for torch weights and NumPy inputs."""
    torch_threads: int | None = None
    """torch.set_num_threads for ncps (None: torch's default, one per core). On a busy
    machine torch's OpenMP pool degrades badly when oversubscribed; 1 is then fairer."""
    out: str = "benchmarks/results/cfc_vs_ncps"
    """Output path without extension (relative to the repository root)."""


def _time_calls(fn: Callable[[], object], *, repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) wall-clock seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": metadata.version("jaxlib"),
        "flax": metadata.version("flax"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ncps": metadata.version("ncps"),
        "numpy": np.__version__,
    }


def _models(variant: str, cfg: Config):
    """(ncps kwargs, our CfC) for a variant."""
    from ncps import wirings

    if variant == "plain":
        return dict(units=cfg.units, backbone_units=cfg.backbone_units), cfc.CfC(
            cfg.units, backbone_units=cfg.backbone_units
        )
    if variant == "mixed_memory":
        return dict(units=cfg.units, backbone_units=cfg.backbone_units, mixed_memory=True), cfc.CfC(
            cfg.units, backbone_units=cfg.backbone_units, mixed_memory=True
        )
    if variant == "autoncp":
        return dict(units=wirings.AutoNCP(cfg.units, 8)), cfc.CfC(wiring=nw.AutoNCP(cfg.units, 8))
    raise ValueError(f"Unknown variant {variant!r}; expected one of ['plain', 'mixed_memory', 'autoncp'].")


def bench_one(variant: str, batch: int, cfg: Config) -> dict:
    import torch
    from ncps.torch import CfC as TorchCfC

    torch.manual_seed(cfg.seed)
    theirs_kwargs, ours = _models(variant, cfg)
    theirs = TorchCfC(cfg.input_size, **theirs_kwargs).eval()
    params = {"params": ncps_weights.params_from_ncps({k: v.numpy() for k, v in theirs.state_dict().items()})}

    rng = np.random.default_rng(cfg.seed)
    x_tbf = rng.normal(size=(cfg.seq_len, batch, cfg.input_size)).astype(np.float32)
    x_ours = jnp.asarray(x_tbf)
    x_theirs = torch.from_numpy(np.ascontiguousarray(x_tbf.transpose(1, 0, 2)))

    forward = jax.jit(lambda p, x: ours.apply(p, x)[0])

    def loss(p, x):
        return jnp.mean(ours.apply(p, x)[0] ** 2)

    grad = jax.jit(jax.grad(loss))

    def ours_fwd():
        forward(params, x_ours).block_until_ready()

    def ours_fwd_bwd():
        jax.block_until_ready(grad(params, x_ours))

    def theirs_fwd():
        with torch.no_grad():
            theirs(x_theirs)

    def theirs_fwd_bwd():
        theirs.zero_grad(set_to_none=True)
        out, _ = theirs(x_theirs)
        (out**2).mean().backward()

    start = time.perf_counter()
    ours_fwd()
    compile_fwd = time.perf_counter() - start
    start = time.perf_counter()
    ours_fwd_bwd()
    compile_bwd = time.perf_counter() - start

    # Same weights, same inputs: same outputs.
    with torch.no_grad():
        want = theirs(x_theirs)[0].numpy().transpose(1, 0, 2)
    max_abs_diff = float(np.abs(np.asarray(forward(params, x_ours)) - want).max())

    kw = dict(repeats=cfg.repeats, warmup=cfg.warmup)
    timings = {
        "jax_fwd": _time_calls(ours_fwd, **kw),
        "torch_fwd": _time_calls(theirs_fwd, **kw),
        "jax_fwd_bwd": _time_calls(ours_fwd_bwd, **kw),
        "torch_fwd_bwd": _time_calls(theirs_fwd_bwd, **kw),
    }
    row = {
        "variant": variant,
        "seq_len": cfg.seq_len,
        "batch_size": batch,
        "input_size": cfg.input_size,
        "units": cfg.units,
        "backbone_units": cfg.backbone_units if variant != "autoncp" else None,
        "max_abs_output_diff": max_abs_diff,
        "jax_first_call_fwd_s": compile_fwd,
        "jax_first_call_fwd_bwd_s": compile_bwd,
    }
    for name, (median, fastest) in timings.items():
        row[f"{name}_s"] = median
        row[f"{name}_min_s"] = fastest
    row["speedup_fwd"] = row["torch_fwd_s"] / row["jax_fwd_s"]
    row["speedup_fwd_bwd"] = row["torch_fwd_bwd_s"] / row["jax_fwd_bwd_s"]
    return row


def _markdown(result: dict) -> str:
    m = result["machine"]

    def ms(row: dict, name: str) -> str:
        return f"{1e3 * row[name + '_s']:.2f} ({1e3 * row[name + '_min_s']:.2f})"

    lines = [
        "# CfC: jaxatari (Flax, jit) vs ncps 1.0.1 (PyTorch, eager)",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['affinity_cpus']} usable); "
        f"jax {m['jax']} (backend {m['jax_backend']}), flax {m['flax']}, torch {m['torch']} "
        f"(threads: {m['torch_threads']}), ncps {m['ncps']}, Python {m['python']}.",
        f"Load average (1 min) before / after: {result['load_average_before']:.2f} / "
        f"{result['load_average_after']:.2f}. The machine was shared with other jobs while this ran, "
        "so absolute times are noisy (eager torch suffers most); the min column is the least disturbed.",
        *(
            [
                f"torch was limited to {result['config']['torch_threads']} thread(s) (`--torch-threads`): on a "
                "busy machine its default one-thread-per-core OpenMP pool is oversubscribed and far slower."
            ]
            if result["config"].get("torch_threads") is not None
            else []
        ),
        "",
        f"ms per call of a whole [T, B, F] sequence: median (min) of {result['config']['repeats']} calls "
        f"after {result['config']['warmup']} warm-up calls (for JAX, after compilation). Forward: ncps "
        "under `torch.no_grad()`, ours `jax.jit(apply)`. Fwd+bwd: gradient of mean(out^2) w.r.t. all "
        "weights. Speed-up = ncps median / ours median. Same weights (converted with `params_from_ncps`) "
        "and inputs for both; the max abs output difference checks that they compute the same thing.",
        "",
        "| variant | T | B | F | units | ours fwd | ncps fwd | speed-up | ours fwd+bwd "
        "| ncps fwd+bwd | speed-up | max abs out diff | jax compile fwd / fwd+bwd (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['seq_len']} | {r['batch_size']} | {r['input_size']} | {r['units']} "
            f"| {ms(r, 'jax_fwd')} | {ms(r, 'torch_fwd')} | {r['speedup_fwd']:.1f}x "
            f"| {ms(r, 'jax_fwd_bwd')} | {ms(r, 'torch_fwd_bwd')} | {r['speedup_fwd_bwd']:.1f}x "
            f"| {r['max_abs_output_diff']:.1e} | {r['jax_first_call_fwd_s']:.1f} / {r['jax_first_call_fwd_bwd_s']:.1f} |"
        )
    lines += ["", f"Written by `{result['command']}`.", ""]
    return "\n".join(lines)


def main(cfg: Config) -> dict:
    import torch

    for v in cfg.variants:
        _models(v, cfg)  # validate names before any work
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    load_before = os.getloadavg()[0]
    rows = []
    for variant in cfg.variants:
        for batch in cfg.batch_sizes:
            row = bench_one(variant, batch, cfg)
            print(
                f"{variant:13s} T={cfg.seq_len} B={batch:3d}: fwd ours {1e3 * row['jax_fwd_s']:8.2f} ms "
                f"ncps {1e3 * row['torch_fwd_s']:8.2f} ms ({row['speedup_fwd']:.1f}x) | fwd+bwd ours "
                f"{1e3 * row['jax_fwd_bwd_s']:8.2f} ms ncps {1e3 * row['torch_fwd_bwd_s']:8.2f} ms "
                f"({row['speedup_fwd_bwd']:.1f}x) | max diff {row['max_abs_output_diff']:.1e}",
                flush=True,
            )
            rows.append(row)
    result = {
        "command": "python benchmarks/cfc_vs_ncps.py " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "config": dataclasses.asdict(cfg),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "rows": rows,
    }
    out = REPO / cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
