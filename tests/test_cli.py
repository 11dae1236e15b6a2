"""The command line of every training script: integers as 1e6 / 10M, one-line errors (exit 2), a grouped --help."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from jaxatari import cli, configs, data, errors
from jaxatari.agents import a2c, bc, dqn, ppo, pqn

CONFIGS = {"ppo": ppo.Config, "a2c": a2c.Config, "dqn": dqn.Config, "pqn": pqn.Config, "bc": bc.Config,
           "collect": data.CollectConfig}


def run_main(monkeypatch, capsys, config_cls, *argv):
    """``cli.main`` on ``argv``: (exit code, stdout, stderr); training must not start."""
    monkeypatch.setattr("sys.argv", ["script.py", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main(config_cls, lambda c: pytest.fail(f"trained despite {argv}"), description="The script.")
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("text, value", [("1e6", 1_000_000), ("1_000_000", 1_000_000), ("10M", 10_000_000),
                                         ("500k", 500_000), ("1.5e3", 1500), ("2000", 2000)])
def test_integer_flags_take_scientific_underscored_and_suffixed_values(text, value):
    c = configs.cli(ppo.Config, argv=["--total-timesteps", text, f"--num-envs={text}"])
    assert c.total_timesteps == value and type(c.total_timesteps) is int and c.num_envs == value
    assert configs.cli(dqn.Config, argv=["--mlp-hidden", "1e2", "64"]).mlp_hidden == (100, 64)


@pytest.mark.parametrize("text", ["1e6.5", "1.2345k", "1e-3", "ten", "1.5"])
def test_a_non_integer_is_refused_in_one_sentence(monkeypatch, capsys, text):
    code, out, err = run_main(monkeypatch, capsys, ppo.Config, "--total-timesteps", text)
    assert code == 2 and out == ""
    assert err == f"error: --total-timesteps {text} is not accepted: it must be an integer (e.g. 1000000, 1e6, 1M).\n"


@pytest.mark.parametrize("config_cls, argv, message", [
    (ppo.Config, ["--bogus", "1"], "error: --bogus is not a flag here; --help lists the flags."),
    (ppo.Config, ["--num-env", "4"], "error: --num-env is not a flag here; did you mean --num-envs? "),
    (ppo.Config, ["--num-envs"], "error: --num-envs needs a value: an integer (e.g. 1000000, 1e6, 1M)."),
    (ppo.Config, ["--env-backend"], "error: --env-backend needs a value: one of auto, xla, callback."),
    (ppo.Config, ["--gamma", "x"], "error: --gamma x is not accepted: it must be a number (e.g. 0.5, 2.5e-4)."),
    (ppo.Config, ["--anneal-lr", "3"], "error: --anneal-lr takes no value ('3' given); use --anneal-lr or "),
    (ppo.Config, ["--tensorboard=no"], "error: --tensorboard takes no value ('no' given)"),
    (ppo.Config, ["Breakout-v5"], "error: 'Breakout-v5' is not accepted here: every value follows its flag"),
    (ppo.Config, ["--env", "Pong-v5", "extra"], "error: 'extra' is not accepted here"),
    (dqn.Config, ["--mlp-hidden", "64", "x"], "error: --mlp-hidden x is not accepted: it must be an integer"),
    (data.CollectConfig, ["--out", "d"], "error: --run-dir is required: The expert: a jaxatari run directory"),
])
def test_every_parsing_error_is_one_line_exit_2(monkeypatch, capsys, config_cls, argv, message):
    """tyro's boxed panels (unknown flag, missing value, bad type) become one sentence naming the flag."""
    code, out, err = run_main(monkeypatch, capsys, config_cls, *argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not re.search(r"[│╭╰─]", err)


def test_the_bool_flags_and_optional_values_still_parse():
    assert configs.cli(ppo.Config, argv=["--no-tensorboard", "--num-envs", "None", "--seed", "-1"]) == ppo.Config(
        tensorboard=False, seed=-1)
    assert configs.cli(pqn.Config, argv=["--no-anneal-lr"]).anneal_lr is False
    assert configs.cli(pqn.Config, argv=["--anneal-lr"]).anneal_lr is True
    assert configs.cli(pqn.Config, argv=["--anneal-lr", "None"]).anneal_lr is None
    assert configs.cli(ppo.Config, argv=["--env_option", "a=1", "b=2", "--run_dir=x"]).env_option == ("a=1", "b=2")


def test_a_bad_value_in_a_stored_config_is_one_sentence_without_a_warning(tmp_path, monkeypatch, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**configs.config_to_json(ppo.Config(env="CartPole-v1")),
                                               "algo": "ppo", "num_envs": "eight"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run_main(monkeypatch, capsys, ppo.Config, "--resume", str(d))
    assert code == 2
    assert err == f"error: --num-envs 'eight' in {d / 'config.json'} is not accepted: it must be an integer.\n"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_help_is_grouped_with_one_line_docs_and_one_default(monkeypatch, capsys, name):
    code, out, err = run_main(monkeypatch, capsys, CONFIGS[name], "--env", "x", "--help")
    assert code in (0, None) and err == ""
    assert out.startswith("usage: script.py") and "The script." in out
    assert "{None}" not in out and "Default:" not in out and "│" not in out
    flags = re.findall(r"^  (--[a-z0-9-]+)", out, re.M)
    assert len(flags) == len(set(flags)) == len(configs._flags(CONFIGS[name]))
    for line in out.splitlines():
        if line.startswith("  --"):
            assert line.count("(default:") <= 1
    assert out.count("(default:") == len(flags)  # one default each, never split over two lines
    sections = re.findall(r"^([a-z/-]+):$", out, re.M)
    order = ["common/env", "run", "algorithm", "options", "network", "scale-out"]
    assert sections == sorted(sections, key=order.index)


def test_ppo_help_groups_and_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_main(monkeypatch, capsys, ppo.Config, "-h")
    assert code == 0
    sections = {s: body for s, body in re.findall(r"^([a-z/-]+):\n((?:  .*\n)+)", out, re.M)}
    assert list(sections) == ["common/env", "run", "algorithm", "network", "scale-out"]
    assert "--num-envs INT" in sections["common/env"] and "--total-timesteps INT" in sections["run"]
    assert "--gamma FLOAT" in sections["algorithm"] and "--cfc-units INT" in sections["network"]
    assert "--num-agents INT" in sections["scale-out"]
    assert re.search(r"--num-envs INT +Parallel envs \(the global batch\)\. \(default: by env kind\)\n", out)
    assert re.search(r"--tensorboard/--no-tensorboard +Write TensorBoard .*\(default: on\)\n", out)
    assert re.search(r"--env-option STR\.\.\. .*\(default: none\)\n", out)
    assert re.search(r"--chunk-steps INT .*between\)\. \(default: 10k Atari on CPU, else 50k\)\n", out)
    assert re.search(r"--clip-coef FLOAT +Surrogate clip epsilon\. \(default: by env kind\)\n", out)
    assert "Atari 10M steps, 8 envs" in out  # the Config's docstring states the defaults by env kind
    code, out, _ = run_main(monkeypatch, capsys, dqn.Config, "--help")
    assert re.search(r"--batch-size INT +Transitions per gradient step\. \(default: by --dqn-preset\)\n", out)
    assert re.search(r"--dqn-preset STR .*\(default: by env kind\)\n", out)


def test_existing_refusals_are_kept():
    with pytest.raises(errors.ConfigError, match=r"--num-envs is given more than once"):
        configs.cli(ppo.Config, argv=["--num-envs", "1e3", "--num_envs", "8"])
    with pytest.raises(errors.ConfigError, match=r"--overlap-learning was removed"):
        configs.cli(ppo.Config, argv=["--overlap-learning"])
