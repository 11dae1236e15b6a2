"""Pure maths: returns, advantages and losses (time-major ``[T, B]``)."""

from jaxatari.ops.losses import (
    A2CBatch,
    A2CLossInfo,
    PPOBatch,
    PPOLossInfo,
    a2c_loss,
    all_finite,
    categorical_entropy,
    categorical_log_prob,
    masked_mean,
    ppo_loss,
    standardize,
    weighted_loss,
)
from jaxatari.ops.returns import gae, n_step_returns, q_lambda_returns
from jaxatari.ops.td import (
    DQNBatch,
    DQNLossInfo,
    double_q_learning_target,
    dqn_loss,
    q_learning_target,
    td_loss,
)

__all__ = [
    "A2CBatch",
    "A2CLossInfo",
    "DQNBatch",
    "DQNLossInfo",
    "PPOBatch",
    "PPOLossInfo",
    "a2c_loss",
    "all_finite",
    "categorical_entropy",
    "categorical_log_prob",
    "double_q_learning_target",
    "dqn_loss",
    "gae",
    "masked_mean",
    "n_step_returns",
    "ppo_loss",
    "q_lambda_returns",
    "standardize",
    "q_learning_target",
    "td_loss",
    "weighted_loss",
]
