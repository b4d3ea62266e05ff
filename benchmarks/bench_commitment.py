"""What commit-before-reveal and bound inputs cost per window, against the flow they replaced.

    .venv/bin/python benchmarks/bench_commitment.py              # ~1 minute on 2 cores
    .venv/bin/python benchmarks/bench_commitment.py --repeat 1   # a quick look

One miner's Δ of the tiny preset (5.3 M parameters, one shard), int8 on both sides as in
`configs/demo.yaml`, best of `--repeat`, each new cost against the old one measured in the
same run:

- miner, before (the replaced flow): `compression.encode` (int8 blockwise) and
  `Store.publish_contribution` (signed manifest, fsync'd files) before the deadline;
- miner, now: `averaging.parts.wire_parts` (hivemind's parts, int8, serialized once,
  what `ShardAverager.prepare` does), `Store.prepare_contribution` (safetensors bytes,
  sha256, signed manifest listing every part's sha256), the `commit_contribution`
  extrinsic (signing, submit with its dry-run, and the block that includes it) and
  `Store.reveal_contribution` after the deadline;
- a reducer, now: the sha256 of every part it receives (`message_digest`), against
  decoding those parts, which it did before too;
- validator, before: load the contribution (every store check) and decode int8;
- validator, now: `validation.admission.admit` with the commitment (digest of the
  revealed manifest), every store check, each part against its digest, decoding the parts.

Bytes: the payload file and the manifest each way, the manifest body every member now
gathers into its group's matchmaking (msgpack, sent to every peer of the group), and the
commit extrinsic as the ledger stores it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hivemind.proto import runtime_pb2  # noqa: E402
from hivemind.utils.serializer import MSGPackSerializer  # noqa: E402

from averaging.compression import decode, encode  # noqa: E402
from averaging.parts import (  # noqa: E402
    decode_parts,
    encode_parts,
    message_digest,
    part_layout,
    payload_params,
    payload_tensors,
    wire_parts,
)
from averaging.wire import codec_for  # noqa: E402
from chain.keys import Keypair  # noqa: E402
from chain.ledger import Ledger  # noqa: E402
from store.api import open_store  # noqa: E402
from store.config import StoreConfig  # noqa: E402
from store.manifest import Compression, commitment_body, manifest_bytes  # noqa: E402
from tensormine.config import load_config  # noqa: E402
from train.model import build_model  # noqa: E402
from validation.admission import Roster, admit, payload_specs  # noqa: E402


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The fastest of `repeat` calls, and what that call returned."""
    fastest, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        got = fn()
        took = time.perf_counter() - start
        if took < fastest:
            fastest, out = took, got
    return fastest, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config("configs/demo.yaml")
    wire, part_size = cfg.averaging.wire, cfg.averaging.wire_part_size_bytes
    model = build_model(cfg.model, 0)
    g = torch.Generator().manual_seed(0)
    delta = {n: 1e-3 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    shapes = {n: tuple(t.shape) for n, t in delta.items()}
    params = sum(t.numel() for t in delta.values())
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chain = cfg.chain.model_copy(update={"db": root / "ledger.sqlite"})
        owner, miner = Keypair.generate(), Keypair.generate()
        ledger = Ledger.create(chain.db, chain, owner.address)
        ledger.submit_call(miner, "faucet", {"amount": 10**12})
        ledger.submit_call(miner, "register", {})
        ledger.produce_block()
        uid = ledger.uid_of(miner.address)
        assert uid is not None
        store = open_store(StoreConfig(root=root / "store"))
        roster = Roster(window=0, shards=1, miners={miner.address: uid})
        window = [0]

        # ---- the miner, before --------------------------------------------------------
        def old_miner() -> Any:
            window[0] += 1
            encoded = encode(delta, cfg.compression, None)
            how = Compression(scheme=cfg.compression.scheme, params=encoded.params)
            return store.publish_contribution(
                encoded.tensors, keypair=miner, uid=uid, window=window[0], shard=0, compression=how
            )

        old_miner_s, old_ref = best(old_miner, args.repeat)
        old_manifest = store.read_manifest(old_ref)

        # ---- the miner, now -----------------------------------------------------------
        def new_miner() -> Any:
            window[0] += 1
            t0 = time.perf_counter()
            blobs, _values = wire_parts(delta, wire, part_size)
            p = payload_params(blobs, list(shapes), wire, part_size)
            prepared = store.prepare_contribution(
                payload_tensors(blobs), keypair=miner, uid=uid, window=window[0], shard=0,
                compression=Compression(scheme="wire", params=p),
            )  # fmt: skip
            t1 = time.perf_counter()
            xt = ledger.submit_call(
                miner, "commit_contribution", {"round": window[0], "digest": prepared.digest}
            )
            ledger.produce_block()
            receipt = ledger.receipt(xt)
            assert receipt is not None and receipt.ok
            t2 = time.perf_counter()
            ref = store.reveal_contribution(prepared)
            t3 = time.perf_counter()
            timings = {"prepare": t1 - t0, "commit": t2 - t1, "reveal": t3 - t2}
            return ref, prepared, blobs, timings

        new_miner_s, (new_ref, prepared, blobs, timings) = best(new_miner, args.repeat)
        # Both flows encode the parts for the all-reduce in the averager's process (now
        # again, from the same values, to the same bytes): the same cost either way.
        codec = codec_for(wire)
        layout = part_layout(list(shapes.values()), codec, part_size)
        ordered = [delta[n] for n in shapes]
        wire_s, _ = best(lambda: encode_parts(ordered, layout, codec), args.repeat)
        gathered = len(MSGPackSerializer.dumps(commitment_body(prepared.manifest)))
        extrinsic = ledger.conn.execute(
            "SELECT LENGTH(body) FROM extrinsics ORDER BY block DESC LIMIT 1"
        ).fetchone()[0]

        # ---- a reducer ----------------------------------------------------------------
        messages = [runtime_pb2.Tensor.FromString(b) for b in blobs]
        digest_s, _ = best(lambda: [message_digest(m) for m in messages], args.repeat)
        largest = max(len(b) for b in blobs)
        decode_s, _ = best(
            lambda: decode_parts(blobs, layout, wire, max_part_bytes=largest), args.repeat
        )

        # ---- the validator ------------------------------------------------------------
        def old_validator() -> Any:
            p = old_manifest.compression.params
            got = store.load_contribution(
                old_ref, hotkey=miner.address, uid=uid, window=old_ref.window, shard=0,
                expected=payload_specs(shapes, p),
            )  # fmt: skip
            return decode(got.tensors, p, shapes)

        old_val_s, _ = best(old_validator, args.repeat)
        commitment = ledger.contribution_commitment(miner.address, new_ref.window)

        def new_validator() -> Any:
            out = admit(
                store, new_ref, roster=Roster(new_ref.window, 1, roster.miners),
                window=new_ref.window, shapes={0: shapes}, scheme="wire", commitment=commitment,
                deadline_block=ledger.block_number() + 1, wire=(wire, part_size),
            )  # fmt: skip
            assert not hasattr(out, "reason"), out
            return out

        new_val_s, _ = best(new_validator, args.repeat)
        ledger.close()

    old_bytes = old_manifest.size
    new_bytes = prepared.manifest.size
    print(f"# bench_commitment, {platform.node()} ({platform.machine()}), {dt.date.today()}")
    print(f"tiny preset, {params:,} parameters in one shard, wire {wire}, parts of {part_size} B")
    print(f"{len(blobs)} parts; best of {args.repeat}; torch threads 1")
    print()
    print("| side | before | now | now / before |")
    print("| --- | --- | --- | --- |")
    print(
        f"| miner, per window | {old_miner_s * 1e3:.1f} ms (encode + publish) | "
        f"{new_miner_s * 1e3:.1f} ms (parts {timings['prepare'] * 1e3:.1f} + commit "
        f"{timings['commit'] * 1e3:.1f} + reveal {timings['reveal'] * 1e3:.1f}) | "
        f"{new_miner_s / old_miner_s:.2f} |"
    )
    print(
        f"| miner, the round's wire encoding | {wire_s * 1e3:.1f} ms | {wire_s * 1e3:.1f} ms "
        "(same bytes as the committed parts) | 1.00 |"
    )
    print(
        f"| reducer, per member's Δ | {decode_s * 1e3:.1f} ms (decode its parts) | "
        f"+{digest_s * 1e3:.1f} ms (sha256 of its parts) | {(decode_s + digest_s) / decode_s:.2f} |"
    )
    print(
        f"| validator, per contribution | {old_val_s * 1e3:.1f} ms (load + decode) | "
        f"{new_val_s * 1e3:.1f} ms (commitment + load + part digests + decode) | "
        f"{new_val_s / old_val_s:.2f} |"
    )
    print(
        f"| payload bytes | {old_bytes:,} (int8 blockwise) | {new_bytes:,} (int8 wire parts) | "
        f"{new_bytes / old_bytes:.2f} |"
    )
    old_m, new_m = len(manifest_bytes(old_manifest)), len(manifest_bytes(prepared.manifest))
    print(f"| manifest bytes | {old_m:,} | {new_m:,} (lists {len(blobs)} part digests) | "
          f"{new_m / old_m:.2f} |")  # fmt: skip
    print(f"| gathered into matchmaking, per member | 0 | {gathered:,} B of manifest body | – |")
    print(f"| ledger, per miner and window | 0 | one extrinsic, {extrinsic} B stored | – |")


if __name__ == "__main__":
    main()
