"""Train A2C on an EnvPool game: ``python scripts/a2c.py --env SpaceInvaders-v5``.

``--help`` lists every flag; ``--target gae`` switches the value targets from
n-step returns to GAE; ``--resume RUN_DIR`` continues an interrupted run.
"""

from jaxatari.agents import a2c
from jaxatari.cli import main
from jaxatari.driver import train

if __name__ == "__main__":
    main(a2c.Config, lambda c: train(a2c.ALGORITHM, c), description=__doc__)
