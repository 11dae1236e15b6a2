"""Reading the order of an optimized, scheduled XLA program (``compiled.as_text()``):
where EnvPool's sends and receives, and the instructions of interest, sit."""

import re


def env_step_orders(hlo: str, is_work=lambda line: False) -> list[list[str]]:
    """For each computation that holds an EnvPool send: its instructions in
    schedule order as tokens ``S<g>`` (send of pool ``g``), ``R<g>`` (recv) and
    ``W`` (``is_work(line)``); pools are numbered in order of first appearance."""
    pools: dict[str, int] = {}
    orders = []
    for comp in re.split(r"\n(?=\S.*\{\s*$)", hlo, flags=re.M):
        if '_send"' not in comp:
            continue
        seq = []
        for line in comp.splitlines()[1:]:
            m = re.search(r'custom_call_target="\w+?_(\d+)_(send|recv)"', line)
            if m:
                seq.append(f"{m.group(2)[0].upper()}{pools.setdefault(m.group(1), len(pools))}")
            elif is_work(line):
                seq.append("W")
        orders.append(seq)
    return orders
