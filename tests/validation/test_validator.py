"""The validator against a real ledger and store, with miners of every behaviour."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from averaging.compression import encode
from averaging.config import CompressionConfig
from store import layout
from store.manifest import Compression, build_manifest, manifest_bytes
from store.safetensors_check import TensorSpec
from tensormine.cli import main as cli_main
from tests.validation.conftest import Subnet
from train.model import model_fingerprint
from validation.report import read_reports

Factory = Callable[..., Subnet]
BEHAVIOURS = ["honest", "free_rider", "noise", "copier", "wrong_data"]


def test_honest_miner_takes_the_weight_and_a_restart_keeps_it(
    subnet_factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = subnet_factory(BEHAVIOURS)
    uids = {name: net.uid(name) for name in BEHAVIOURS}
    validator = net.validator()
    reports = []
    for window in (1, 2, 3):
        if window == 3:
            # A validator that stops (here: closes) and starts again resumes its averages.
            ema_before = dict(validator.state.ema)
            theta_before = model_fingerprint(validator.model.state_dict())
            validator.close()
            validator = net.validator()
            assert validator.resume()
            assert validator.state.ema == ema_before
            assert validator.state.window == 3
            assert model_fingerprint(validator.model.state_dict()) == theta_before
        net.mine(window)
        net.to_deadline(window)
        reports.append(validator.process_window(window))
    validator.close()
    # A hivemind group average of window 3 checked against the admitted Δ (sent pre-int8).
    pair = [uids["honest"], uids["free_rider"]]
    mean = {n: d / 2 for n, d in net.deltas["honest"].items()}
    error, ok = validator.check_group_average(0, mean, pair)
    assert ok and error < 0.02
    assert not validator.check_group_average(0, net.deltas["honest"], pair)[1]
    assert not validator.check_group_average(0, mean, [*pair, 999])[1]

    alpha = net.cfg.validation.ema_alpha
    ema = dict.fromkeys(uids.values(), 0.0)
    own_ok = {name: 0 for name in ("honest", "wrong_data")}
    for rep in reports:
        rows = {r.uid: r for r in rep.miners}
        assert rep.contributions == rep.admitted == len(BEHAVIOURS)
        honest = rows[uids["honest"]]
        assert honest.loss_delta is not None and honest.loss_delta > 0
        assert honest.copy_of is None
        # The own-data check is statistical (t ≥ 2 over 16 pairs): an honest miner passes
        # nearly always, one trained on other pages nearly never.
        for name in own_ok:
            own_ok[name] += bool(rows[uids[name]].own_ok)
        assert honest.score == (honest.loss_delta if honest.own_ok else 0.0)
        assert rows[uids["free_rider"]].score == 0.0
        assert rows[uids["free_rider"]].loss_delta == pytest.approx(0.0, abs=1e-9)
        assert rows[uids["noise"]].score == 0.0
        copier = rows[uids["copier"]]
        assert copier.copy_of == uids["honest"] and copier.score == 0.0
        assert copier.copy_cosine is not None and copier.copy_cosine > 0.8
        # The moving average follows m ← (1 − α)m + α·s across the restart.
        ema = {u: (1 - alpha) * ema[u] + alpha * rows[u].score for u in ema}
        assert {u: rows[u].ema for u in ema} == pytest.approx(ema)
        # θ_{w+1} is published with its provenance (its loss on E may be above θ_w's:
        # Nesterov momentum 0.9 overshoots with a single contributor).
        assert rep.published == f"window-{rep.window + 1}"
        assert rep.next_heldout_loss is not None
        prov = net.store.read_provenance(net.store.resolve(window=rep.window + 1))
        credited = sorted(u for u, r in rows.items() if u is not None and r.score > 0)
        assert sorted(c.uid for c in prov.contributors) == credited
        assert prov.metrics["heldout_loss"] == pytest.approx(rep.next_heldout_loss)
    assert own_ok["honest"] >= 2 and own_ok["wrong_data"] <= 1, own_ok
    final = {r.uid: r.weight for r in reports[-1].miners}
    assert final[uids["honest"]] > 0.75 and final[uids["honest"]] == max(final.values())
    assert [r.window for r in read_reports(net.cfg.run.dir / "validators/v0/windows.jsonl")] == [
        1, 2, 3,
    ]  # fmt: skip

    # The published checkpoint loads with transformers alone.
    pulled = tmp_path / "theta4"
    net.store.pull_checkpoint(pulled, window=4, progress=False)
    AutoModelForCausalLM.from_pretrained(str(pulled))

    # The weights reached the ledger, and Yuma pays the honest miner.
    net.ledger.produce_block()
    row = dict(net.ledger.weights()[0])
    assert row[uids["honest"]] == 65535
    net.ledger.advance(net.cfg.chain.tempo + 1)
    incentive = {n.uid: n.incentive for n in net.ledger.neurons() if n.uid in uids.values()}
    assert incentive[uids["honest"]] > 0.75
    assert incentive[uids["honest"]] == max(incentive.values())

    code = cli_main(
        ["validator", "report", "--config", "configs/tiny.yaml",
         *[a for s in net.sets for a in ("--set", s)], "--hotkey", "v0", "--last", "2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "validator v0: last 2 window(s)" in out and "copy" in out and "own-data" in out
    assert "window 3: 5/5 admitted" in out


def _payload(net: Subnet, window: int) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    delta = {n: d.clone() for n, d in net.deltas["honest"].items()}
    encoded = encode(delta, net.cfg.compression, None)
    return dict(encoded.tensors), dict(encoded.params)


def test_bad_contributions_score_zero_with_a_named_reason(subnet_factory: Factory) -> None:
    names = ["honest", "nan", "shape", "badsig", "pickle", "late", "silent", "shard", "fp16"]
    net = subnet_factory(names)
    uids = {name: net.uid(name) for name in names}
    validator = net.validator()
    window = 1
    net.mine(window, ["honest"])
    scheme = net.cfg.compression.scheme
    tensors, params = _payload(net, window)
    compression = Compression(scheme=scheme, params=params)

    def publish(
        name: str, payload: dict[str, torch.Tensor], shard: int = 0, how: Compression = compression
    ) -> None:
        net.store.publish_contribution(
            payload, keypair=net.miners[name], uid=uids[name], window=window, shard=shard,
            compression=how,
        )  # fmt: skip

    publish("shard", tensors, shard=1)  # the run has one shard: 1 is not this miner's
    fp16 = encode(net.deltas["honest"], CompressionConfig(scheme="fp16"), None)
    publish("fp16", fp16.tensors, how=Compression(scheme="fp16", params=fp16.params))

    nan = dict(tensors)
    scale = next(k for k in nan if k.endswith("::scale"))
    nan[scale] = nan[scale].clone()
    nan[scale][0] = float("nan")
    publish("nan", nan)
    short = dict(tensors)
    q = next(k for k in short if k.endswith("::q"))
    short[q] = short[q][:-1].clone()
    publish("shape", short)
    publish("badsig", tensors)
    folder = net.store.backend.root / layout.contribution_dir(window, 0)  # type: ignore[attr-defined]
    manifest_path = folder / layout.contribution_manifest_name(net.miners["badsig"].address)
    body = json.loads(manifest_path.read_text())
    body["created_at"] = "2020-01-01T00:00:00+00:00"  # changed after signing
    manifest_path.write_text(json.dumps(body))
    # A pickle (what torch.save writes) under a signed manifest with the right sha256.
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    raw = buffer.getvalue()
    kp = net.miners["pickle"]
    sha = hashlib.sha256(raw).hexdigest()
    file_name = layout.contribution_file_name(kp.address, sha)
    (folder / file_name).write_bytes(raw)
    manifest = build_manifest(
        kp, uid=uids["pickle"], window=window, shard=0, file_name=file_name, size=len(raw),
        sha256=sha, compression=compression,
        tensors={k: TensorSpec.of(v) for k, v in tensors.items()},
    )  # fmt: skip
    (folder / layout.contribution_manifest_name(kp.address)).write_bytes(manifest_bytes(manifest))
    net.to_deadline(window)
    time.sleep(0.05)  # the store's clock moves past the deadline block's timestamp
    publish("late", tensors)

    report = validator.process_window(window)
    validator.close()
    rows = {r.uid: r for r in report.miners}
    expected = {
        "nan": "not_finite",
        "shape": "shape_mismatch",
        "badsig": "bad_signature",
        "pickle": "not_safetensors",
        "late": "late",
        "silent": "missing",
        "shard": "wrong_shard",
        "fp16": "compression_mismatch",
    }
    assert {name: rows[uids[name]].reason for name in expected} == expected
    assert all(rows[uids[name]].score == 0.0 for name in expected)
    assert rows[uids["honest"]].status == "scored" and rows[uids["honest"]].score > 0
    assert report.published == "window-2"
