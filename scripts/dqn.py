"""Train DQN on an EnvPool game: ``python scripts/dqn.py --env Pong-v5``.

The whole act-store-sample-learn loop is compiled; ``--num-envs`` envs step
in parallel at the replay ratio ``--gradient-steps / --train-frequency``.
``--dqn-preset nature|pong-fast|classic`` picks the hyperparameters (default:
nature on Atari, classic otherwise), ``--preset`` the Atari env options.
``--help`` lists every flag; ``--resume RUN_DIR`` continues an interrupted run.
"""

from jaxatari.agents import dqn
from jaxatari.cli import main
from jaxatari.driver import train

if __name__ == "__main__":
    main(dqn.Config, lambda c: train(dqn.ALGORITHM, c), description=__doc__)
