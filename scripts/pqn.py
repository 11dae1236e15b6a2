"""Train PQN on an EnvPool game: ``python scripts/pqn.py --env Breakout-v5``.

Q-learning for vectorised envs (Gallici et al. 2024): no replay buffer, no target
network, Q(lambda) targets over each rollout. ``--pqn-preset cleanrl|purejaxql|classic``
picks the hyperparameters; ``--help`` lists every flag; ``--resume RUN_DIR``
continues an interrupted run.
"""

from jaxatari.agents import pqn
from jaxatari.cli import main
from jaxatari.driver import train

if __name__ == "__main__":
    main(pqn.Config, lambda c: train(pqn.ALGORITHM, c), description=__doc__)
