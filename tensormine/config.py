"""Loading a run config: YAML file + command-line overrides -> one validated `RunConfig`.

    cfg = load_config("configs/demo.yaml", ["chain.tempo=10", "chain.block_time_s=0.5"])

Every component contributes one section (`chain`, ...); the file may leave any section or
key out and gets the defaults. Errors are `ConfigError`s whose message names the file and
the dotted key, e.g. ``configs/demo.yaml: chain.tempo: Input should be greater than or
equal to 1 (got 0)``. Overrides use the same dotted keys; their values are parsed as YAML
scalars, so ``chain.yuma3=true`` is a bool and ``chain.tempo=10`` an int.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from averaging.config import CompressionConfig, OuterConfig
from averaging.settings import AveragingConfig
from chain.config import ChainConfig
from common.errors import ConfigError as ConfigError  # the name callers import
from common.schema import StrictModel
from common.tracking import WandbConfig
from store.config import StoreConfig
from subnet.config import SubnetConfig
from train.config import DataConfig, ModelConfig, TrainConfig, WindowConfig
from validation.config import ValidationConfig

logger = logging.getLogger(__name__)

# The outer step measured best for sharded models (plain steps, no momentum;
# benchmarks/bench_moe.py).
DAMPED_OUTER_LR = 0.5


class RunSection(StrictModel):
    """What identifies a run and where its files live."""

    name: str = Field(default="local", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(default=0, ge=0)
    dir: Path = Path("runs/local")


class RunConfig(StrictModel):
    """The whole configuration of a run; written into every checkpoint's metadata."""

    run: RunSection = RunSection()
    chain: ChainConfig = ChainConfig()
    store: StoreConfig = StoreConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    window: WindowConfig = WindowConfig()
    outer: OuterConfig = OuterConfig()
    compression: CompressionConfig = CompressionConfig()
    averaging: AveragingConfig = AveragingConfig()
    wandb: WandbConfig = WandbConfig()
    validation: ValidationConfig = ValidationConfig()
    subnet: SubnetConfig = SubnetConfig()

    @model_validator(mode="after")
    def _one_momentum(self) -> RunConfig:
        """SparseLoCo's error feedback already is a momentum; a second one in the outer step
        is allowed (tests use it) but is rarely what anyone wants."""
        if self.averaging.enabled and self.averaging.wire == "sparseloco" and self.outer.momentum:
            logger.warning(
                "averaging.wire is sparseloco and outer.momentum is %g: the error feedback "
                "(averaging.sparseloco.error_decay) already acts as the outer momentum; "
                "SparseLoCo steps with outer.lr and no momentum",
                self.outer.momentum,
            )
        return self

    @model_validator(mode="after")
    def _shards_need_proof_of_work(self) -> RunConfig:
        """Validators judge the training of a shard without the LM head (inner layers, an
        expert group) by proof of work: its own-data gap carries no signal
        (`validation.scoring.OWN_POW`, `train.shards.holds_head`)."""
        pow_on = self.validation.pow_checks > 0 and self.train.pow_segments > 0
        if self.model.shards > 1 and self.validation.own_data_pairs > 0 and not pow_on:
            logger.warning(
                "model.shards is %d with proof of work off (validation.pow_checks, "
                "train.pow_segments): validators fall back to the own-data check for the "
                "shards without the LM head (%s), which cannot see their training, so "
                "their miners will mostly earn 0",
                self.model.shards,
                "the expert shards" if self.model.expert_shards else "inner layers",
            )
        return self

    @model_validator(mode="after")
    def _shards_want_a_damped_step(self) -> RunConfig:
        """Shards are trained apart from the same θ_w and stepped together: a parallel
        block update, which overshoots at a whole plain step, and more with an outer
        momentum (benchmarks/RESULTS.md, "the sharding cost is an undamped outer step" and
        "Nesterov outer steps on shards")."""
        outer = self.outer
        if self.model.shards <= 1:
            return self
        if outer.momentum > 0:
            logger.warning(
                "model.shards is %d with an outer momentum of %g: shards trained apart and "
                "stepped together overshoot, and momentum carries the overshoot on "
                "(measured, 4 layer shards: Nesterov 0.7/0.9 diverged to 7.3 nats, 0.35/0.9 "
                "5.9, plain 0.5 5.5); try --set outer.momentum=0 --set outer.nesterov=false "
                "--set outer.lr=%g",
                self.model.shards, outer.momentum, DAMPED_OUTER_LR,
            )  # fmt: skip
        elif outer.lr > DAMPED_OUTER_LR:
            logger.warning(
                "model.shards is %d with plain outer steps of lr %g: shards trained apart "
                "and stepped together overshoot at a whole step (measured: outer.lr 0.5 "
                "ended 0.8-1.4 nats lower after 20 windows); try --set outer.lr=%g",
                self.model.shards, outer.lr, DAMPED_OUTER_LR,
            )  # fmt: skip
        return self

    @model_validator(mode="after")
    def _affinity_needs_experts(self) -> RunConfig:
        if self.data.expert_affinity > 0 and not self.model.expert_shards:
            raise ValueError(
                "data.expert_affinity draws an expert group's pages from its partition: it "
                f"needs model.arch mixtral and model.shards >= 2 (got {self.model.arch}, "
                f"{self.model.shards} shard(s))"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _files_under_run_dir(cls, data: Any) -> Any:
        """The ledger and the local store live in the run's folder unless a config puts
        them elsewhere: `--set run.dir=runs/other` moves the whole run."""
        if not isinstance(data, Mapping):
            return data
        tree = dict(data)
        run = tree.get("run")
        run_dir = run.get("dir") if isinstance(run, Mapping) else None
        folder = Path(run_dir) if isinstance(run_dir, str | Path) else RunSection().dir
        for section, key, name in (("chain", "db", "ledger.sqlite"), ("store", "root", "store")):
            part = tree.get(section) or {}
            if isinstance(part, Mapping) and key not in part:
                tree[section] = {**part, key: folder / name}
        return tree

    def to_json_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON types (for manifests and checkpoints)."""
        result: dict[str, Any] = json.loads(self.model_dump_json())
        return result


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise ConfigError(f"{source}: {dotted!r} is not a dotted key like chain.tempo")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["chain.tempo=10", ...]`` into a nested dict; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. chain.tempo=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: value is not valid YAML: {exc}") from exc
        _set_dotted(tree, key.strip(), value, f"--set {item}")
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError, source: str, tree: Mapping[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key")
        elif "input" in err and err["type"] != "missing":
            lines.append(f"{source}: {key}: {err['msg']} (got {err['input']!r})")
        else:
            lines.append(f"{source}: {key}: {err['msg']}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key twice in one mapping is an error: PyYAML
    keeps the last silently, so a second `model:` section would replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, with duplicate keys refused (`yaml.YAMLError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read `path` (or the built-in defaults when None), apply overrides, validate."""
    source = "defaults" if path is None else str(path)
    tree: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            loaded = read_yaml(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        tree = loaded
    override_list = list(overrides)
    if override_list:
        source = f"{source} (with --set {' '.join(override_list)})"
        tree = _merge(tree, parse_overrides(override_list))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, tree)) from None
