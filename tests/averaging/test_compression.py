"""Compression: round-trip error per scheme, error feedback, byte ratios, hostile payloads."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from averaging.compression import (
    CompressionError,
    decode,
    encode,
    expected_specs,
)
from averaging.config import CompressionConfig, TopKConfig
from train.config import ModelConfig
from train.shards import param_shapes

logger = logging.getLogger(__name__)

# Shapes that exercise full chunks, a short last chunk, a tensor smaller than a chunk,
# and a tensor smaller than k.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.layers.0.mlp.up_proj.weight": (48, 40),  # 1920 = 7 chunks of 256 + 128
    "model.layers.0.input_layernorm.weight": (100,),  # one chunk of 100
    "model.norm.weight": (3,),
}
TOPK = CompressionConfig(scheme="topk", topk=TopKConfig(chunk=256, density=0.05))  # k = 13


def make_delta(seed: int = 0, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def round_trip(delta: dict[str, torch.Tensor], cfg: CompressionConfig) -> dict[str, torch.Tensor]:
    enc = encode(delta, cfg)
    json.dumps(enc.params)  # the params travel in a JSON manifest
    return decode(enc.tensors, enc.params, SHAPES)


def test_none_is_exact_and_fp16_within_1e_3() -> None:
    delta = make_delta()
    exact = round_trip(delta, CompressionConfig(scheme="none"))
    half = round_trip(delta, CompressionConfig(scheme="fp16"))
    for name, x in delta.items():
        assert exact[name].dtype == torch.float32 and exact[name].shape == x.shape
        assert torch.equal(exact[name], x)
        # Relative 1e-3 in fp16's normal range; below 2^-14 the spacing is 2^-24 absolute.
        assert bool(((half[name] - x).abs() <= 1e-3 * x.abs() + 2.0**-25).all())


def test_int8_is_within_half_a_scale_per_element() -> None:
    delta = make_delta()
    delta["model.norm.weight"] = torch.zeros(3)  # an all-zero block decodes to zeros
    cfg = CompressionConfig(scheme="int8", int8_block_size=64)
    enc = encode(delta, cfg)
    out = decode(enc.tensors, enc.params, SHAPES)
    for name, x in delta.items():
        flat = x.reshape(-1)
        scale = enc.tensors[f"{name}::scale"]
        assert scale.numel() == math.ceil(flat.numel() / 64)
        per_value = scale.repeat_interleave(64)[: flat.numel()]
        err = (out[name].reshape(-1) - flat).abs()
        assert bool((err <= per_value / 2 * (1 + 1e-5) + 1e-12).all()), name
        assert int(enc.tensors[f"{name}::q"].abs().max()) <= 127
    assert torch.equal(out["model.norm.weight"], torch.zeros(3))


def test_topk_keeps_exactly_the_largest_per_chunk() -> None:
    delta = make_delta()
    cfg = TOPK.model_copy(update={"error_feedback": False})
    enc = encode(delta, cfg)
    assert enc.residual is None and enc.params["values"] == "float16"
    out = decode(enc.tensors, enc.params, SHAPES)
    for name, x in delta.items():
        flat, got = x.reshape(-1), out[name].reshape(-1)
        chunk = min(256, flat.numel())
        k = math.ceil(0.05 * chunk)
        for start in range(0, flat.numel(), chunk):
            part, kept = flat[start : start + chunk], got[start : start + chunk]
            want = set(part.abs().topk(min(k, part.numel())).indices.tolist())
            assert set(kept.nonzero().reshape(-1).tolist()) == want, (name, start)
            idx = sorted(want)
            torch.testing.assert_close(kept[idx], part[idx], rtol=1e-3, atol=0)
    # A tensor smaller than a chunk is its own chunk: 3 values, k = ceil(0.05·3) = 1.
    assert enc.tensors["model.norm.weight::idx"].shape == (1, 1)


def test_topk_short_last_chunk_points_past_the_end_with_zeros() -> None:
    shapes = {"w": (300,)}  # chunks of 256: the last has 44 values, fewer than k = 128
    cfg = CompressionConfig(scheme="topk", topk=TopKConfig(chunk=256, density=0.5))
    delta = {"w": torch.arange(1.0, 301.0)}
    enc = encode(delta, cfg)
    idx, val = enc.tensors["w::idx"], enc.tensors["w::val"]
    assert idx.shape == (2, 128) and idx.dtype == torch.int16
    assert bool((val[1][idx[1] >= 44] == 0).all()) and int((idx[1] < 44).sum()) == 44
    out = decode(enc.tensors, enc.params, shapes)["w"]
    assert torch.equal(out[256:], delta["w"][256:])  # the short chunk is kept whole


def test_topk_wide_values_and_int32_indices() -> None:
    shapes = {"w": (40_000,)}
    cfg = CompressionConfig(scheme="topk", topk=TopKConfig(chunk=65_536, density=0.001))
    delta = {"w": torch.zeros(40_000)}
    delta["w"][123] = 1e6  # beyond fp16
    enc = encode(delta, cfg)
    assert enc.params["values"] == "float32"
    assert enc.tensors["w::idx"].dtype == torch.int32  # one chunk of 40,000 > 32,768
    assert float(decode(enc.tensors, enc.params, shapes)["w"][123]) == 1e6


def test_error_feedback_tracks_the_sum_of_inputs() -> None:
    shapes = {"w": (4096,)}
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(4096, generator=g)
    gaps: dict[bool, float] = {}
    for feedback in (True, False):
        cfg = TOPK.model_copy(update={"error_feedback": feedback})
        residual: dict[str, torch.Tensor] | None = None
        sent, received = torch.zeros(4096), torch.zeros(4096)
        norms: list[float] = []
        for _ in range(100):
            delta = {"w": 0.3 * direction + torch.randn(4096, generator=g)}
            enc = encode(delta, cfg, residual)
            residual = enc.residual
            sent += delta["w"]
            received += decode(enc.tensors, enc.params, shapes)["w"]
            if residual is not None:
                # Exactly what has not been delivered yet is held back.
                torch.testing.assert_close(sent - received, residual["w"], atol=1e-3, rtol=0)
                norms.append(float(residual["w"].norm()))
        gaps[feedback] = float((sent - received).norm() / sent.norm())
        if feedback:
            step = float(delta["w"].norm())
            assert max(norms) < 4 * step  # bounded: does not grow with the rounds
            assert max(norms[50:]) < 1.2 * max(norms[:50])
    assert gaps[True] < 0.1 < 0.5 < gaps[False]


def test_residual_only_for_topk_with_feedback() -> None:
    delta = make_delta()
    for scheme in ("none", "fp16", "int8"):
        assert (
            encode(
                delta, CompressionConfig.model_validate({"scheme": scheme}), residual=delta
            ).residual
            is None
        )
    enc = encode(delta, TOPK, residual={"model.norm.weight": torch.ones(3)})  # subset is fine
    assert enc.residual is not None and set(enc.residual) == set(delta)


def test_byte_ratios_on_the_tiny_model() -> None:
    shapes = {n: s for n, (s, _) in param_shapes(ModelConfig()).items()}
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(s, generator=g) * 1e-3 for n, s in shapes.items()}
    fp32 = sum(t.numel() * 4 for t in delta.values())
    ratios = {}
    for scheme in ("none", "fp16", "int8", "topk", "sparseloco"):
        enc = encode(delta, CompressionConfig.model_validate({"scheme": scheme}))
        assert enc.nbytes == sum(t.numel() * t.element_size() for t in enc.tensors.values())
        ratios[scheme] = enc.nbytes / fp32
    logger.info("bytes vs fp32 on the tiny model: %s", ratios)
    assert ratios["none"] == 1.0 and ratios["fp16"] == 0.5
    assert ratios["int8"] == pytest.approx(0.25 + 1 / 256, rel=1e-3)  # q + one fp32 per block
    assert ratios["topk"] == pytest.approx(0.02, rel=0.02)  # 2 % of values, 2 + 2 bytes each
    # 64 of every 4,096: 12-bit positions, 2-bit values, two fp16 levels = 928 bits a chunk.
    assert ratios["sparseloco"] == pytest.approx(928 / 4096 / 32, rel=0.01)


def test_payload_survives_safetensors_and_json(tmp_path: Path) -> None:
    for scheme in ("none", "fp16", "int8", "topk", "sparseloco"):
        enc = encode(make_delta(), CompressionConfig.model_validate({"scheme": scheme}))
        path = tmp_path / f"{scheme}.safetensors"
        save_file(enc.tensors, str(path))
        tensors = load_file(str(path))
        assert set(tensors) == set(expected_specs(SHAPES, enc.params))
        params = json.loads(json.dumps(enc.params))
        out = decode(tensors, params, SHAPES)
        ref = decode(enc.tensors, enc.params, SHAPES)
        for name in SHAPES:
            assert torch.equal(out[name], ref[name])


def test_encode_rejects_what_it_cannot_send() -> None:
    delta = make_delta()
    delta["model.norm.weight"][1] = float("inf")
    with pytest.raises(CompressionError, match="non-finite"):
        encode(delta, CompressionConfig(scheme="int8"))
    with pytest.raises(CompressionError, match="fp16"):
        encode({"w": torch.tensor([1e5])}, CompressionConfig(scheme="fp16"))
    with pytest.raises(CompressionError, match="residual"):
        encode(make_delta(), TOPK, residual={"x": torch.zeros(1)})
    with pytest.raises(CompressionError, match="residual shape"):
        encode(make_delta(), TOPK, residual={"model.norm.weight": torch.zeros(4)})


Mutation = Callable[[dict[str, torch.Tensor], dict[str, Any]], None]
N = "model.layers.0.mlp.up_proj.weight"


def _set(key: str, value: Any) -> Mutation:
    def mutate(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
        params[key] = value

    return mutate


def _tensor(key: str, fn: Callable[[torch.Tensor], Any]) -> Mutation:
    def mutate(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
        tensors[key] = fn(tensors[key])

    return mutate


def _poke(key: str, index: tuple[int, ...], value: float) -> Mutation:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return _tensor(key, fn)


def _drop(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
    del tensors[f"{N}::idx"]


def _add(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
    tensors["model.layers.9.mlp.up_proj.weight::idx"] = tensors[f"{N}::idx"]


def _rename(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
    tensors[f"{N}::indices"] = tensors.pop(f"{N}::idx")


def _not_mapping(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
    params.clear()


def _swap_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, [0, 1]] = t[0, [1, 0]]
    return t


TOPK_FAULTS: dict[str, tuple[Mutation, str]] = {
    "missing tensor": (_drop, "missing"),
    "unexpected tensor": (_add, "unexpected"),
    "renamed tensor": (_rename, "do not match"),
    "index dtype": (_tensor(f"{N}::idx", lambda t: t.to(torch.int32)), "dtype"),
    "value dtype": (_tensor(f"{N}::val", lambda t: t.to(torch.float32)), "dtype"),
    "flattened": (_tensor(f"{N}::idx", lambda t: t.reshape(-1)), "shape"),
    "fewer rows": (_tensor(f"{N}::idx", lambda t: t[:-1]), "shape"),
    "not a tensor": (_tensor(f"{N}::val", lambda t: t.tolist()), "not a tensor"),
    "negative index": (_poke(f"{N}::idx", (0, 0), -1), "outside"),
    "index too large": (_poke(f"{N}::idx", (0, 12), 256), "outside"),
    "unsorted indices": (_tensor(f"{N}::idx", _swap_rows), "strictly increase"),
    "repeated index": (_poke(f"{N}::idx", (0, 1), 0), "strictly increase"),
    "nan value": (_poke(f"{N}::val", (2, 3), float("nan")), "non-finite"),
    "inf value": (_poke(f"{N}::val", (2, 3), float("inf")), "non-finite"),
    "past the end": (_poke(f"{N}::idx", (7, 12), 200), "past the end"),
    "unknown scheme": (_set("scheme", "zstd"), "unknown compression scheme"),
    "extra param": (_set("level", 3), "exactly the keys"),
    "chunk mismatch": (_set("chunk", 512), "shape|dtype"),
    "chunk type": (_set("chunk", "256"), "integer"),
    "chunk bool": (_set("chunk", True), "integer"),
    "chunk small": (_set("chunk", 8), "integer"),
    "density zero": (_set("density", 0.0), "density"),
    "density big": (_set("density", 1.5), "density"),
    "density str": (_set("density", "0.05"), "density"),
    "values dtype": (_set("values", "bfloat16"), "values"),
    "params cleared": (_not_mapping, "unknown compression scheme"),
}


@pytest.mark.parametrize("fault", sorted(TOPK_FAULTS))
def test_malformed_topk_payloads_raise(fault: str) -> None:
    enc = encode(make_delta(), TOPK.model_copy(update={"error_feedback": False}))
    tensors, params = dict(enc.tensors), dict(enc.params)
    decode(tensors, params, SHAPES)  # the untouched payload is fine
    mutate, message = TOPK_FAULTS[fault]
    mutate(tensors, params)
    with pytest.raises(CompressionError, match=message):
        decode(tensors, params, SHAPES)


INT8_FAULTS: dict[str, tuple[Mutation, str]] = {
    "q -128": (_poke(f"{N}::q", (5,), -128), "-128"),
    "q dtype": (_tensor(f"{N}::q", lambda t: t.to(torch.int16)), "dtype"),
    "q length": (_tensor(f"{N}::q", lambda t: t[:-1]), "shape"),
    "scale inf": (_poke(f"{N}::scale", (1,), float("inf")), "non-finite"),
    "scale negative": (_poke(f"{N}::scale", (1,), -1.0), "negative"),
    "scale fp16": (_tensor(f"{N}::scale", lambda t: t.half()), "dtype"),
    "block mismatch": (_set("block_size", 128), "shape"),
    "block huge": (_set("block_size", 1 << 21), "integer"),
    "missing block": (lambda t, p: p.pop("block_size"), "exactly the keys"),
}


@pytest.mark.parametrize("fault", sorted(INT8_FAULTS))
def test_malformed_int8_payloads_raise(fault: str) -> None:
    enc = encode(make_delta(), CompressionConfig(scheme="int8", int8_block_size=64))
    tensors, params = dict(enc.tensors), dict(enc.params)
    mutate, message = INT8_FAULTS[fault]
    mutate(tensors, params)
    with pytest.raises(CompressionError, match=message):
        decode(tensors, params, SHAPES)


@pytest.mark.parametrize("scheme", ["none", "fp16"])
def test_malformed_dense_payloads_raise(scheme: str) -> None:
    enc = encode(make_delta(), CompressionConfig.model_validate({"scheme": scheme}))
    other = "fp16" if scheme == "none" else "none"
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({**enc.tensors, N: enc.tensors[N].reshape(-1)}, enc.params, "shape"),
        ({**enc.tensors, N: enc.tensors[N].double()}, enc.params, "dtype"),
        (enc.tensors, {"scheme": other}, "dtype"),
        ({**enc.tensors, N: enc.tensors[N] * float("nan")}, enc.params, "non-finite"),
        ({k: v for k, v in enc.tensors.items() if k != N}, enc.params, "missing"),
    ]
    for tensors, params, message in cases:
        with pytest.raises(CompressionError, match=message):
            decode(tensors, params, SHAPES)
    # Shapes come from the caller: a payload made for other shapes does not fit.
    with pytest.raises(CompressionError, match="shape"):
        decode(enc.tensors, enc.params, {**SHAPES, N: (40, 48)})
    with pytest.raises(CompressionError, match="must be a mapping"):
        decode(enc.tensors, ["none"], SHAPES)  # type: ignore[arg-type]


def test_sparseloco_publication_feeds_its_buffer_back() -> None:
    """`compression.scheme: sparseloco` (averaging off): one message for the whole Δ; what
    was sent plus the new buffer is Δ plus the decayed old buffer, bit for bit up to fp32
    rounding, and the buffer carries over to the next window."""
    cfg = CompressionConfig.model_validate({"scheme": "sparseloco", "sparseloco": {"k": 64}})
    beta = cfg.sparseloco.error_decay
    first, second = make_delta(1), make_delta(2)
    enc = encode(first, cfg)
    assert enc.params == {"scheme": "sparseloco", "chunk": 4096, "k": 64}
    assert sorted(enc.tensors) == ["sparseloco::idx", "sparseloco::lvl", "sparseloco::val"]
    sent = decode(enc.tensors, enc.params, SHAPES)
    assert enc.residual is not None
    for n in SHAPES:
        torch.testing.assert_close(sent[n] + enc.residual[n], first[n], rtol=0, atol=1e-6)
    again = encode(second, cfg, enc.residual)
    sent2 = decode(again.tensors, again.params, SHAPES)
    assert again.residual is not None
    for n in SHAPES:
        want = second[n] + beta * enc.residual[n]
        torch.testing.assert_close(sent2[n] + again.residual[n], want, rtol=0, atol=1e-6)
    # 64 of every 4,096 values; a tensor shorter than a chunk keeps ⌈64·L/4096⌉ of its L.
    kept = sum(int(t.ne(0).sum()) for t in sent.values())
    assert kept == sum(math.ceil(64 * math.prod(s) / 4096) for s in SHAPES.values())


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        ("keys", "exactly the keys"),
        ("k", "k must be an integer"),
        ("truncated", "shape"),
        ("dtype", "dtype"),
        ("lvl", "levels"),
    ],
)
def test_malformed_sparseloco_payloads_raise(fault: str, match: str) -> None:
    enc = encode(make_delta(), CompressionConfig(scheme="sparseloco"))
    tensors, params = dict(enc.tensors), dict(enc.params)
    if fault == "keys":
        params["density"] = 0.1
    elif fault == "k":
        params["k"] = params["chunk"] + 1
    elif fault == "truncated":
        tensors["sparseloco::idx"] = tensors["sparseloco::idx"][:-1]
    elif fault == "dtype":
        tensors["sparseloco::val"] = tensors["sparseloco::val"].to(torch.int8)
    else:
        tensors["sparseloco::lvl"] = tensors["sparseloco::lvl"].flip(1) + 1
    with pytest.raises(CompressionError, match=match):
        decode(tensors, params, SHAPES)
