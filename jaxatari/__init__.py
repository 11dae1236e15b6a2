"""jaxatari: JAX-native reinforcement learning on EnvPool Atari.

The public API, for research code::

    import jaxatari as ja
    env, spec = ja.make("Breakout-v5", num_envs=8, seed=0, preset="nature")
    adv, ret = ja.gae(rewards, values, dones, last_value, gamma=0.99, gae_lambda=0.95)
    policy = ja.load_policy("runs/Breakout-v5__ppo__1__...")

Algorithms live in :mod:`jaxatari.agents` (``ppo``, ``a2c``, ``dqn``, ``bc``), each
ending with the ``ALGORITHM`` that :func:`jaxatari.driver.train` trains; the replay buffer is :mod:`jaxatari.replay`; expert datasets :mod:`jaxatari.data`; the errors a
user sees :mod:`jaxatari.errors`.
"""

from jaxatari import data, errors, replay
from jaxatari.checkpoint import Checkpointer, CheckpointError, CheckpointSaveError
from jaxatari.envs import (
    ATARI_PRESETS,
    EnvSpec,
    episode_stats_init,
    episode_stats_update,
    make,
)
from jaxatari.evaluate import EvalResult, evaluate
from jaxatari.networks import ActorCritic, ConvBlock, ImpalaCNN, MLP, NatureCNN, QNetwork
from jaxatari.networks.cfc import CfC, CfCCell
from jaxatari.networks.ncps_weights import params_from_ncps
from jaxatari.networks.wirings import AutoNCP
from jaxatari.ops import a2c_loss, gae, n_step_returns, ppo_loss
from jaxatari.policy import LoadedPolicy, load_policy

__all__ = [
    "ATARI_PRESETS",
    "ActorCritic",
    "AutoNCP",
    "CfC",
    "CfCCell",
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "ConvBlock",
    "EnvSpec",
    "EvalResult",
    "ImpalaCNN",
    "LoadedPolicy",
    "MLP",
    "NatureCNN",
    "QNetwork",
    "a2c_loss",
    "data",
    "episode_stats_init",
    "episode_stats_update",
    "errors",
    "evaluate",
    "gae",
    "load_policy",
    "make",
    "n_step_returns",
    "params_from_ncps",
    "ppo_loss",
    "replay",
]
