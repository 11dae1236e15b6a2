"""Record a trained policy's games as a behaviour-cloning dataset (ncps layout).

    python scripts/collect.py --run-dir EXPERT_RUN --episodes 100 --out DATA_DIR

Writes ``train_<i>.npz`` and ``val_<i>.npz`` (one sequence of ``--seq-len`` steps
each: ``obs`` uint8 [S, 84, 84, 4], ``actions`` int64 [S]) and ``manifest.json``
(game, preset, the expert's mean return, counts). Train it with scripts/bc.py.
"""

from jaxatari import data
from jaxatari.cli import main

if __name__ == "__main__":
    main(data.CollectConfig, data.collect, description=__doc__)
