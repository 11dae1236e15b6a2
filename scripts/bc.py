"""Behaviour cloning of an expert's games: ``python scripts/bc.py --data DATA_DIR``.

Trains a Conv+CfC clone (``--network`` picks a feed-forward alternative) on a
dataset written by scripts/collect.py (or the ncps Atari-cloning layout, with
``--env``), scoring it after each epoch on validation accuracy and in closed
loop; the best checkpoint by validation accuracy plays with scripts/evaluate.py.
``--help`` lists every flag; ``--resume RUN_DIR`` continues an interrupted run.
"""

from jaxatari.agents import bc
from jaxatari.cli import main

if __name__ == "__main__":
    main(bc.Config, bc.train, description=__doc__)
