"""How close the learner's gradient step gets to the CPU's own matmul rate.

In one process: the CPU's dot throughput (float32 and bfloat16 operands, float32
accumulation) on the torsos' matmul shapes, then gradient steps of the Atari torsos
(Nature CNN, the ncps conv block) on a ``[B, 4, 84, 84]`` batch inside ``lax.fori_loop``,
as in every compiled training chunk, with the torsos' CPU convolution (``impl="im2col"``).

    python benchmarks/cpu_learner.py            # writes benchmarks/results/cpu_learner_<kind>.{json,md}
    python benchmarks/cpu_learner.py --tag before --out-dir /tmp   # e.g. on another commit

The ratio of the two figures is the point, not the absolute rate.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, kind, summary  # noqa: E402

from jaxatari.networks.torsos import ConvBlock, NatureCNN  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOT_SHAPES = ((20736, 512, 64), (12544, 576, 64), (256, 3136, 512), (102400, 256, 32))
"""``M x K x N``: Nature CNN conv 2 and conv 3 as im2col matmuls at batch 256, its dense layer, conv 1."""


def nature_flops(batch: int) -> float:
    """Forward + backward (3x the forward) multiply-adds x 2 of the Nature CNN at ``batch``."""
    mkn = (20 * 20 * 256 * 32) + (9 * 9 * 512 * 64) + (7 * 7 * 576 * 64) + (3136 * 512)
    return 3 * 2 * batch * mkn


@dataclasses.dataclass(frozen=True)
class Args:
    """Measure dot throughput and the torsos' in-loop gradient step on this CPU."""

    batch: int = 256
    """Samples per gradient step (PPO's Atari minibatch: 8 envs x 128 steps / 4)."""
    steps: int = 4
    """Gradient steps per timed call (inside one fori_loop)."""
    repeats: int = 3
    """Timed calls per row; the fastest is reported."""
    tag: str = ""
    """Appended to the file names (e.g. before)."""
    out_dir: str = str(RESULTS_DIR)
    """Where the JSON and Markdown go."""


def _best(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def dot_rates(repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    dot = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
    for m, k, n in DOT_SHAPES:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        row = {"shape": f"{m}x{k}x{n}"}
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            s = _best(dot, jnp.asarray(a, dtype), jnp.asarray(b, dtype), repeats=repeats)
            row[f"{name}_gflops"] = 2 * m * k * n / s / 1e9
        rows.append(row)
    return rows


def grad_step_rate(name: str, net, batch: int, steps: int, repeats: int) -> dict:
    obs = jnp.asarray(np.random.default_rng(1).integers(0, 255, (batch, 4, 84, 84)), jnp.uint8)
    params = net.init(jax.random.PRNGKey(0), obs[:1])
    target = jnp.ones((batch, net.apply(params, obs[:1]).shape[-1]))

    def loss(p):
        return jnp.mean((net.apply(p, obs) - target) ** 2)

    @jax.jit
    def sgd(p):
        def body(_, p):
            return jax.tree.map(lambda w, g: w - 1e-4 * g, p, jax.grad(loss)(p))

        return jax.lax.fori_loop(0, steps, body, p)

    s = _best(sgd, params, repeats=repeats) / steps
    row = {"torso": name, "batch": batch, "ms_per_step": s * 1e3, "samples_per_s": batch / s}
    if name == "nature":
        row["gflops"] = nature_flops(batch) / s / 1e9
    return row


def to_markdown(doc: dict) -> str:
    dots = doc["dots"]
    best32 = max(r["float32_gflops"] for r in dots)
    lines = [
        f"# The learner against the CPU's matmul rate{' (' + doc['tag'] + ')' if doc['tag'] else ''}",
        "",
        f"**Machine:** {doc['machine_summary']}",
        "",
        "## Dot throughput (float32 accumulation)",
        "",
        "| M x K x N | float32 GFLOP/s | bfloat16 GFLOP/s |",
        "|---|---:|---:|",
        *[f"| {r['shape']} | {r['float32_gflops']:.0f} | {r['bfloat16_gflops']:.0f} |" for r in dots],
        "",
        f"## Gradient steps inside fori_loop ({doc['settings']['steps']} per call, fastest of "
        f"{doc['settings']['repeats']} calls)",
        "",
        "| torso | batch | ms per step | samples/s | GFLOP/s | share of the best float32 dot |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["torsos"]:
        g = r.get("gflops")
        lines.append(f"| {r['torso']} | {r['batch']} | {r['ms_per_step']:.0f} | {r['samples_per_s']:,.0f} | "
                     f"{'-' if g is None else f'{g:.0f}'} | {'-' if g is None else f'{g / best32:.0%}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    a = tyro.cli(Args, args=argv)
    machine = describe()
    doc = {
        "machine": machine, "machine_summary": summary(machine), "kind": kind(machine), "tag": a.tag,
        "settings": dataclasses.asdict(a),
        "dots": dot_rates(a.repeats),
        "torsos": [grad_step_rate("nature", NatureCNN(), a.batch, a.steps, a.repeats),
                   grad_step_rate("convblock", ConvBlock(), a.batch, a.steps, a.repeats)],
    }
    stem = f"cpu_learner_{doc['kind']}{'_' + a.tag if a.tag else ''}"
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = to_markdown(doc)
    (out / f"{stem}.md").write_text(md)
    print(md, flush=True)


if __name__ == "__main__":
    main()
