"""Train PPO on an EnvPool game: ``python scripts/ppo.py --env Breakout-v5``.

``--help`` lists every flag; ``--resume RUN_DIR`` continues an interrupted run.
"""

from jaxatari.agents import ppo
from jaxatari.cli import main
from jaxatari.driver import train

if __name__ == "__main__":
    main(ppo.Config, lambda c: train(ppo.ALGORITHM, c), description=__doc__)
