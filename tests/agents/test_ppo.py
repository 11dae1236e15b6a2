"""PPO: config errors, learning on CartPole, the script on Breakout, resume and determinism."""

import json

import chex
import jax
import pytest

from _common import ROOT, assert_cartpole_learns, read_csv, run_script
from jaxatari import configs, driver, errors
from jaxatari.agents import ppo
from jaxatari.driver import train


# ---------------------------------------------------------------------------
# Bad input fails before compiling, naming the values
# ---------------------------------------------------------------------------


def test_steps_not_divisible_names_both_numbers():
    with pytest.raises(errors.ConfigError, match=r"--num-steps 30 is not divisible by --num-minibatches 7"):
        ppo.resolve(ppo.Config(env="Breakout-v5", num_envs=8, num_steps=30, num_minibatches=7))


def test_zero_envs_rejected():
    with pytest.raises(errors.ConfigError, match=r"--num-envs 0"):
        ppo.resolve(ppo.Config(env="CartPole-v1", num_envs=0))


@pytest.mark.parametrize("field, value, accepted", [
    ("learning_rate", -1.0, "> 0"), ("gamma", 1.5, "in (0, 1]"), ("gae_lambda", 2.0, "in [0, 1]"),
    ("clip_coef", -0.2, "> 0"), ("ent_coef", -1.0, ">= 0"), ("checkpoint_every", -5, "an integer >= 0"),
    ("eval_every", -1, "an integer >= 0"), ("eval_episodes", 0, "an integer >= 1"), ("keep", 0, "an integer >= 1"),
    ("num_threads", -3, "an integer >= 0"), ("cfc_units", 0, "an integer >= 1"), ("chunk_steps", 0, "an integer >= 1"),
    ("num_envs", 2.5, "an integer >= 1"), ("update_epochs", 0, "an integer >= 1"),
])
def test_out_of_range_values_name_the_flag_and_the_range(field, value, accepted):
    import re

    flag = "--" + field.replace("_", "-")
    with pytest.raises(errors.ConfigError, match=re.escape(f"{flag} {value!r} is not accepted: it must be {accepted}.")):
        ppo.resolve(ppo.Config(env="CartPole-v1", **{field: value}))


def test_resolve_starts_no_backend():
    """A multi-process run calls jax.distributed.initialize after resolve(), which
    must not have started an XLA backend (the CPU chunk default once did, on Atari)."""
    code = ("from jaxatari.agents import a2c, ppo\n"
            "ppo.resolve(ppo.Config(env='Breakout-v5')); a2c.resolve(a2c.Config(env='Pong-v5'))\n"
            "from jax._src import xla_bridge\n"
            "print('backend started:', xla_bridge.backends_are_initialized())")
    r = run_script("-c", code, timeout=120)
    assert r.returncode == 0 and "backend started: False" in r.stdout, r.stderr[-2000:]


def test_script_rejects_bad_env_id_quickly():
    r = run_script("scripts/ppo.py", "--env", "Breakuot-v5", "--total-timesteps", "100")
    assert r.returncode == 2
    assert "Breakuot-v5" in r.stderr and "Breakout-v5" in r.stderr
    assert "Traceback" not in r.stderr
    assert "Compiled" not in r.stdout


def test_classic_and_atari_defaults():
    c = ppo.resolve(ppo.Config(env="CartPole-v1"))
    a = ppo.resolve(ppo.Config(env="Breakout-v5"))
    assert (a.num_envs, a.num_steps, a.num_minibatches, a.update_epochs, a.clip_coef) == (8, 128, 4, 4, 0.1)
    assert (a.learning_rate, a.ent_coef, a.vf_coef, a.max_grad_norm, a.gae_lambda) == (2.5e-4, 0.01, 0.5, 0.5, 0.95)
    assert a.preset == "nature" and c.preset == "none" and c.clip_coef == 0.2


# ---------------------------------------------------------------------------
# Learning: CartPole with the script's defaults reaches >= 400 within 500k steps
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cartpole_learns(tmp_path):
    assert_cartpole_learns("scripts/ppo.py", tmp_path / "run")


# ---------------------------------------------------------------------------
# The script on a real Atari game
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_breakout_script_writes_run_dir(tmp_path):
    d = tmp_path / "run"
    r = run_script("scripts/ppo.py", "--env", "Breakout-v5", "--total-timesteps", "512", "--num-envs", "8",
                   "--num-steps", "16", "--run-dir", str(d))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["env"] == "Breakout-v5" and cfg["algo"] == "ppo" and cfg["preset"] == "nature"
    assert cfg["env_spec"]["options"]["episodic_life"] is True  # the preset is logged with the run
    rows = read_csv(d / "metrics.csv")
    assert list(rows[0])[:4] == ["global_step", "update", "wall_time", "sps"]
    assert {"episode_return", "episode_length"} <= set(rows[0])
    assert int(rows[-1]["global_step"]) == 512 and len(rows) == 4
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert (d / "checkpoints" / "latest" / "512").is_dir()


def test_default_relative_run_dir_checkpoints_resumes_and_loads(tmp_path, monkeypatch):
    """The README's main command names no --run-dir: the run goes to the relative
    runs/<env>__ppo__<seed>__<time>/, which orbax (absolute paths only) must
    still save to, resume from and load from."""
    script = str(ROOT / "scripts" / "ppo.py")
    args = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "32", "--no-tensorboard"]
    r = run_script(script, *args, "--total-timesteps", "256", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("CartPole-v1__ppo__1__") and (run_dir / "checkpoints" / "latest" / "256").is_dir()
    relative = f"runs/{run_dir.name}"
    assert f"run dir {relative}" in r.stdout and f"--run-dir {relative}" in r.stdout  # shown as the user would type it
    r = run_script(script, "--resume", relative, "--total-timesteps", "512", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed" in r.stdout and (run_dir / "checkpoints" / "latest" / "512").is_dir()
    from jaxatari.policy import load_policy

    monkeypatch.chdir(tmp_path)
    assert load_policy(f"{relative}/checkpoints/latest").meta["step"] == 512
    assert load_policy(relative).meta["step"] in (256, 512)  # the best of the two


def test_a_run_from_before_the_speed_features_were_removed(tmp_path):
    """A config.json that still holds the removed flags, off, resumes (the keys are ignored); with one on, the
    resume is refused (it cannot continue exactly) and load_policy still loads the policy."""
    from jaxatari.policy import load_policy

    def cli(*argv):
        return configs.cli(ppo.Config, argv=list(argv))

    d, path = tmp_path / "run", tmp_path / "run" / "config.json"
    train(ppo.ALGORITHM, cli("--env", "CartPole-v1", "--num-envs", "2", "--num-steps", "8", "--chunk-steps", "16",
                  "--total-timesteps", "16", "--no-tensorboard", "--run-dir", str(d)))
    path.write_text(json.dumps({**json.loads(path.read_text()), "overlap_learning": False, "overlap_microbatches": 1,
                                "env_groups": 1}))
    assert train(ppo.ALGORITHM, cli("--resume", str(d), "--total-timesteps", "32")).global_step == 32
    path.write_text(json.dumps({**json.loads(path.read_text()), "env_groups": 2}))
    with pytest.raises(errors.ConfigError, match=r"was trained with --env-groups 2, which was removed"):
        cli("--resume", str(d), "--total-timesteps", "48")
    assert load_policy(d).meta["step"] == 32


def test_readme_research_loop_runs_and_learns(capsys):
    """The README's "PPO's update in your own loop" block, executed as written."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (code,) = [b for b in blocks if "run.update" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    m = scope["metrics"]
    assert scope["actions"].shape == (128, 8) and int(m["update"]) == 50 and int(m["episode_count"]) > 0
    assert float(capsys.readouterr().out) > 50  # random play averages ~22 on CartPole


# ---------------------------------------------------------------------------
# The compiled chunk traces once
# ---------------------------------------------------------------------------


def test_chunk_compiles_once():
    from jaxatari.driver import Context

    c = ppo.resolve(ppo.Config(env="CartPole-v1", num_envs=2, num_steps=8, total_timesteps=64, devices=1))
    es = driver.make_envs(c, 1, [c.seed])
    ctx = Context(es.spec, ppo.network_spec(c, es.spec), es.step_fn, es.local_envs, 4)
    state = driver.initial_state(ppo.ALGORITHM, c, ctx, es, [c], abstract=False)
    def update(state, handle):
        return ppo.update(c, ctx, state, handle)

    traced = chex.assert_max_traces(update, n=1)
    chunk = driver.make_chunk(traced, es.mesh, driver.state_specs(ppo.ALGORITHM, state, False), 2)
    handle = es.handle
    with jax.transfer_guard("disallow"):  # no implicit host<->device copy inside the training loop
        for _ in range(3):
            state, handle, out = chunk(state, handle)
    assert int(state.update) == 6
