from __future__ import annotations

from pathlib import Path

import pytest

from tensormine.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_subtensors() -> None:
    cfg = load_config()
    assert cfg.chain.tempo == 360 and cfg.chain.block_time_s == 12.0
    assert cfg.chain.max_uids == 256 and abs(cfg.chain.bond_alpha - 0.1) < 1e-12
    assert cfg.chain.owner_cut_u16 == 11796


def test_unknown_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "chain:\n  tempoo: 10\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: chain\.tempoo: unknown key"):
        load_config(path)


def test_a_key_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    # PyYAML would keep the second section silently (configs/moe.yaml once had tiny's
    # `model:` above its own).
    text = "model:\n  hidden_size: 64\ntrain:\n  lr: 0.1\nmodel:\n  hidden_size: 32\n"
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML.*'model' twice \(first on line 1\)"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"(?s)'lr' twice"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n"))


def test_wrong_type_and_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"chain\.tempo: .*integer"):
        load_config(write(tmp_path, "chain:\n  tempo: ten\n"))
    with pytest.raises(ConfigError, match=r"chain\.kappa: .*less than or equal to 1"):
        load_config(write(tmp_path, "chain:\n  kappa: 2.0\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "chain:\n  tempo: 10\n"), ["chain.tempo=20", "chain.yuma3=true"]
    )
    assert cfg.chain.tempo == 20 and cfg.chain.yuma3 is True
    with pytest.raises(ConfigError, match=r"--set chain\.nope=1.*chain\.nope: unknown key"):
        load_config(None, ["chain.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["chain.tempo"])


def test_shipped_configs_load_without_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="tensormine.config"):
        for path in sorted(Path("configs").glob("*.yaml")):
            load_config(path)
    assert caplog.records == [], [r.getMessage() for r in caplog.records]


def test_the_ledger_and_store_follow_the_run_dir(tmp_path: Path) -> None:
    cfg = load_config("configs/demo.yaml", ["run.dir=runs/other"])
    assert cfg.chain.db == Path("runs/other/ledger.sqlite")
    assert cfg.store.root == Path("runs/other/store")
    # ... unless the config puts them elsewhere.
    pinned = write(tmp_path, "run:\n  dir: runs/a\nchain:\n  db: /tmp/l.sqlite\n")
    cfg = load_config(pinned, ["store.root=/tmp/s"])
    assert cfg.chain.db == Path("/tmp/l.sqlite") and cfg.store.root == Path("/tmp/s")
    assert load_config(None).chain.db == Path("runs/local/ledger.sqlite")


def test_sharded_runs_are_warned_about_an_undamped_step_or_no_proof_of_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Warnings for S > 1 (measured in benchmarks/RESULTS.md): a whole plain outer step or
    any outer momentum overshoots, and without proof of work the shards without the head
    go unjudged. The shipped presets raise none of them."""

    def warnings(*sets: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="tensormine.config"):
            load_config("configs/demo.yaml", list(sets))
        return [r.getMessage() for r in caplog.records]

    assert warnings() == []
    step = warnings("model.shards=2")
    assert len(step) == 1 and "try --set outer.lr=0.5" in step[0]
    assert warnings("model.shards=2", "outer.lr=0.5") == []
    momentum = warnings("model.shards=2", "outer.lr=0.7", "outer.momentum=0.9")
    assert len(momentum) == 1 and "outer momentum of 0.9" in momentum[0]
    assert warnings("outer.lr=0.7", "outer.momentum=0.9") == []  # one shard: DiLoCo's step
    unjudged = warnings("model.shards=2", "outer.lr=0.5", "validation.pow_checks=0")
    assert len(unjudged) == 1 and "inner layers" in unjudged[0]
