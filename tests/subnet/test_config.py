"""The `subnet:` section and the `subnet up` options: bad mixes fail before anything starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from subnet.cli import build_overrides_parser, overrides_of, preset_overrides
from subnet.config import SubnetConfig, check
from tensormine.cli import CliError
from tensormine.config import ConfigError, load_config


def test_demo_config_is_valid_and_quiet() -> None:
    cfg = load_config("configs/demo.yaml")
    assert cfg.subnet.miners == 4 and cfg.subnet.validators == 2
    assert check(cfg.subnet, cfg.chain) == []
    # The ledger-only demo reads the chain section of the same file.
    assert cfg.chain.faucet_rao > 0 and cfg.chain.max_validators == cfg.subnet.validators


def test_adversaries_take_the_last_miners() -> None:
    sub = SubnetConfig(miners=4, adversaries=["free-rider", "copier"])
    assert [sub.behaviour(i) for i in range(4)] == ["honest", "honest", "free-rider", "copier"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["subnet.miners=2", "subnet.adversaries=[noise, copier]"], "keep one honest miner"),
        (["subnet.adversaries=[lazy]"], "unknown behaviours .'lazy'."),
        (["subnet.minerz=3"], "subnet.minerz: unknown key"),
        (["subnet.validator_stake_tao=[1500, -1]"], "must be > 0"),
        (["subnet.windows=0"], "subnet.windows"),
    ],
)
def test_section_rejects(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo.yaml", sets)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["subnet.validators=3"], "chain.max_validators 2"),
        (["subnet.validator_stake_tao=[50]"], "below chain.validator_min_stake_rao"),
        (["subnet.validator_fund_tao=10"], "validator_fund_tao 10.0 is below"),
        (["chain.faucet_rao=0"], "needs a faucet"),
        (["chain.backend=bittensor"], "subnet up runs a local ledger"),
    ],
)
def test_cross_section_checks(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg = load_config("configs/demo.yaml", sets)
        check(cfg.subnet, cfg.chain)


def test_spare_permit_slots_warn() -> None:
    cfg = load_config("configs/demo.yaml", ["chain.max_validators=64"])
    warnings = check(cfg.subnet, cfg.chain)
    assert any("stops mining" in w for w in warnings)


def parse(*argv: str) -> argparse.Namespace:
    return build_overrides_parser().parse_args(list(argv))


def test_options_become_overrides_and_set_wins() -> None:
    args = parse(
        "--miners", "3", "--validators", "1", "--windows", "2", "--shards", "2",
        "--adversaries", "free-rider,copier", "--processes-per-miner", "2",
        "--set", "subnet.miners=5",
    )  # fmt: skip
    sets = overrides_of(args)
    cfg = load_config("configs/demo.yaml", sets)
    assert cfg.subnet.miners == 5  # an explicit --set comes last
    assert cfg.subnet.validators == 1 and cfg.chain.max_validators == 1
    assert cfg.subnet.adversaries == ["free-rider", "copier"]
    assert cfg.model.shards == 2 and cfg.subnet.processes_per_miner == 2
    assert cfg.subnet.windows == 2


def test_bad_adversary_name_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--adversaries", "free-rider,lazy")
    assert "unknown behaviour lazy" in capsys.readouterr().err


def test_preset_takes_the_model_and_its_outer_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    demo = load_config("configs/demo.yaml")
    with caplog.at_level("WARNING", logger="tensormine.config"):
        cfg = load_config("configs/demo.yaml", preset_overrides("small"))
        moe = load_config("configs/demo.yaml", preset_overrides("moe"))
    assert cfg.model.hidden_size == 768 and cfg.model.vocab_size == 32000
    # The sharded presets' half plain step comes along, so no warning about it.
    assert cfg.outer == load_config("configs/small.yaml").outer and cfg.outer.lr == 0.5
    assert moe.model.shards == 5 and moe.outer == load_config("configs/moe.yaml").outer
    assert caplog.records == [], [r.getMessage() for r in caplog.records]
    # Data, the inner loop and windows stay the demo's.
    assert (cfg.data, cfg.train, cfg.window) == (demo.data, demo.train, demo.window)
    with pytest.raises(CliError, match="no such preset"):
        preset_overrides("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  shards: 2\nouter: 0.5\n")
    with pytest.raises(CliError, match="outer: is not a mapping"):
        preset_overrides(str(bad))


def test_every_behaviour_can_be_an_adversary() -> None:
    every = ["free-rider", "noise", "copier", "wrong-data", "heldout", "mixer", "backdater"]
    cfg = load_config(
        "configs/demo.yaml",
        ["subnet.miners=9", f"subnet.adversaries=[{', '.join([*every, 'poisoner'])}]"],
    )
    assert cfg.subnet.adversaries == [*every, "poisoner"]
