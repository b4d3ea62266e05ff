"""Pseudo-gradient compression: encode Δ for publication, decode (and validate) it back.

    from averaging.compression import encode, decode, CompressionError

    enc = encode(delta, cfg.compression, residual)     # delta: {param name: fp32 tensor}
    store.publish_contribution(enc.tensors, ..., compression=Compression(
        scheme=cfg.compression.scheme, params=enc.params))
    residual = enc.residual                            # keep for the next window (top-k)

    # A validator, with shapes from *its own* model (never from the payload):
    shapes = {name: param_shapes(cfg.model)[name][0] for name in shard_names}
    try:
        delta = decode(tensors, manifest.compression.params, shapes)
    except CompressionError as exc:
        ...                                            # score 0, log exc

`params` is small JSON (it travels in the signed manifest) and always names the scheme.
Payload tensors, for each parameter `N` (e.g. `model.layers.0.mlp.up_proj.weight`):

- `none`: params `{"scheme": "none"}`; tensor `N`, float32, the parameter's shape.
- `fp16`: params `{"scheme": "fp16"}`; tensor `N`, float16, the parameter's shape.
- `int8`: params `{"scheme": "int8", "block_size": B}`; tensors `N::q` int8 [numel] and
  `N::scale` float32 [⌈numel/B⌉].
- `topk`: params `{"scheme": "topk", "chunk": C, "density": d, "values": "float16" or
  "float32"}`; tensors `N::idx` int16 [rows, k] (int32 when the chunk c > 32768) and
  `N::val` [rows, k] of the `values` dtype.
- `sparseloco`: params `{"scheme": "sparseloco", "chunk": C, "k": K}`; one message for
  the whole Δ (`averaging.sparseloco`: K of every C values, 2-bit values, packed
  indices), tensors `sparseloco::idx`, `sparseloco::val`, `sparseloco::lvl`, sized from
  the caller's shapes. Its error-feedback buffer (e ← β·e + Δ, β =
  `sparseloco.error_decay`) is the residual.

**int8** is blockwise absmax: the flattened tensor is cut into blocks of `B` values (the
last may be shorter), `scale = absmax / 127` in fp32 and `q = round(x / scale)` in
[-127, 127], so each value is off by at most `scale / 2`.

**topk** keeps, in every chunk of `c = min(C, numel)` consecutive values of the flattened
tensor (`rows = ⌈numel / c⌉`, the last chunk may be shorter), the `k = ⌈d·c⌉` values of
largest magnitude: `idx` holds their positions within the chunk in strictly ascending
order, `val` their values. When the last chunk has fewer than `k` values, the surplus
slots point past its end and carry 0. Values go as fp16 unless one would overflow it.
With error feedback (SparseLoCo / DeMo style, arXiv 2508.15706) the sender compresses
`Δ + residual` and keeps `residual ← Δ + residual − decode(sent)`, so what top-k (and
fp16 rounding) dropped is sent in a later window: the sum of decoded messages tracks the
sum of pseudo-gradients up to the (bounded) current residual.

`decode` treats the payload as hostile: names, dtypes, shapes (computed from the caller's
`shapes`), index ranges and order, and finiteness are all checked before a value is
returned, and every failure is a `CompressionError` (a `ValueError`) that names the tensor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from averaging import sparseloco
from averaging.config import TOPK_CHUNK_RANGE, CompressionConfig
from averaging.sparseloco import SparseSpec
from common.errors import TensormineError

logger = logging.getLogger(__name__)

SEP = "::"
SCHEMES = ("none", "fp16", "int8", "topk", "sparseloco")
SPARSELOCO_KEY = "sparseloco"  # the prefix of a sparseloco payload's three tensors
INT8_MAX = 127
FP16_MAX = float(torch.finfo(torch.float16).max)
# Bounds mirror CompressionConfig's; a payload's params are validated against them.
INT8_BLOCK_RANGE = (8, 1 << 20)
TOPK_MIN_CHUNK, TOPK_MAX_CHUNK = TOPK_CHUNK_RANGE
_VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}

Spec = tuple[torch.dtype, tuple[int, ...]]


class CompressionError(TensormineError, ValueError):
    """A pseudo-gradient cannot be encoded, or a payload is malformed."""


@dataclass(frozen=True)
class Encoded:
    """A compressed pseudo-gradient.

    `tensors` go into the safetensors file, `params` into the manifest, `residual` (top-k
    with error feedback only, else None) stays with the sender, and `nbytes` is the
    payload's tensor bytes (the file adds a small JSON header).
    """

    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]
    residual: dict[str, torch.Tensor] | None
    nbytes: int


# ---- layout, shared by the encoder and the decoder --------------------------------------


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _chunk(numel: int, chunk: int) -> int:
    return max(1, min(chunk, numel))


def _topk_k(density: float, chunk: int) -> int:
    # The epsilon keeps e.g. 0.1 × 4090 = 409.00000000000006 from rounding up to 410.
    return max(1, min(chunk, math.ceil(density * chunk - 1e-9)))


def _index_dtype(chunk: int) -> torch.dtype:
    return torch.int16 if chunk <= 1 << 15 else torch.int32


def _check_params(params: Any) -> dict[str, Any]:
    """The payload's params, checked; raises CompressionError."""
    if not isinstance(params, Mapping):
        raise CompressionError(f"compression params must be a mapping, got {type(params).__name__}")
    scheme = params.get("scheme")
    if scheme not in SCHEMES:
        raise CompressionError(f"unknown compression scheme {scheme!r}; expected one of {SCHEMES}")
    keys = {
        "none": {"scheme"},
        "fp16": {"scheme"},
        "int8": {"scheme", "block_size"},
        "topk": {"scheme", "chunk", "density", "values"},
        "sparseloco": {"scheme", "chunk", "k"},
    }[scheme]
    if set(params) != keys:
        raise CompressionError(
            f"{scheme} params must have exactly the keys {sorted(keys)}, got {sorted(params)}"
        )

    def integer(key: str, low: int, high: int) -> int:
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CompressionError(f"{scheme} params: {key} must be an integer in [{low}, {high}]")
        return value

    if scheme == "int8":
        integer("block_size", *INT8_BLOCK_RANGE)
    if scheme == "topk":
        integer("chunk", TOPK_MIN_CHUNK, TOPK_MAX_CHUNK)
        density = params["density"]
        if (
            isinstance(density, bool)
            or not isinstance(density, int | float)
            or not 0 < density <= 1
        ):
            raise CompressionError("topk params: density must be a number in (0, 1]")
        if params["values"] not in _VALUE_DTYPES:
            raise CompressionError(f"topk params: values must be one of {sorted(_VALUE_DTYPES)}")
    if scheme == "sparseloco":
        chunk = integer("chunk", 64, 1 << 16)
        integer("k", 1, chunk)
    return dict(params)


def _sparse_spec(params: Mapping[str, Any]) -> SparseSpec:
    return SparseSpec(chunk=int(params["chunk"]), k=int(params["k"]))


def expected_specs(
    shapes: Mapping[str, Sequence[int]], params: Mapping[str, Any]
) -> dict[str, Spec]:
    """Every payload tensor's name, dtype and shape for these parameter shapes and params.

    A validator can compare a manifest's tensor list with this before loading the file.
    """
    p = _check_params(params)
    scheme = p["scheme"]
    specs: dict[str, Spec] = {}
    if scheme == "sparseloco":
        spec = _sparse_spec(p)
        message = sparseloco.sizes(sparseloco.layout(shapes, spec), spec)
        return {f"{SPARSELOCO_KEY}{SEP}{key}": dt for key, dt in message.items()}
    for name, raw_shape in shapes.items():
        shape = tuple(int(d) for d in raw_shape)
        numel = _numel(shape)
        if scheme == "none":
            specs[name] = (torch.float32, shape)
        elif scheme == "fp16":
            specs[name] = (torch.float16, shape)
        elif scheme == "int8":
            specs[f"{name}{SEP}q"] = (torch.int8, (numel,))
            specs[f"{name}{SEP}scale"] = (torch.float32, (-(-numel // p["block_size"]),))
        else:
            chunk = _chunk(numel, p["chunk"])
            rows, k = -(-numel // chunk), _topk_k(float(p["density"]), chunk)
            specs[f"{name}{SEP}idx"] = (_index_dtype(chunk), (rows, k))
            specs[f"{name}{SEP}val"] = (_VALUE_DTYPES[p["values"]], (rows, k))
    return specs


# ---- encoding -----------------------------------------------------------------------------


def _int8_encode(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    numel = flat.numel()
    blocks = -(-numel // block)
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    rows = padded.view(blocks, block)
    scale = rows.abs().amax(dim=1) / INT8_MAX
    # An all-zero block has scale 0; dividing by 1 there keeps q = 0 instead of NaN.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(-1)[:numel].clone(), scale


def _topk_encode(
    flat: torch.Tensor, chunk_cfg: int, density: float
) -> tuple[torch.Tensor, torch.Tensor]:
    numel = flat.numel()
    chunk = _chunk(numel, chunk_cfg)
    rows, k = -(-numel // chunk), _topk_k(density, chunk)
    padded = torch.zeros(rows * chunk, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    magnitude = padded.abs()
    # Padding ranks below every real value, so it is only picked when a chunk is short.
    magnitude[numel:] = -1.0
    idx = magnitude.view(rows, chunk).topk(k, dim=1).indices.sort(dim=1).values
    val = padded.view(rows, chunk).gather(1, idx)
    return idx.to(_index_dtype(chunk)), val


def encode(
    delta: Mapping[str, torch.Tensor],
    cfg: CompressionConfig,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> Encoded:
    """Compress the pseudo-gradient `delta` with `cfg.scheme` (see the module docstring).

    `residual` (names a subset of `delta`'s; absent = 0) is used only by top-k with error
    feedback; the returned `Encoded.residual` then covers every name of `delta`. Raises
    `CompressionError` for a non-finite Δ or one that fp16 cannot hold.
    """
    if cfg.scheme == "sparseloco":
        return _sparseloco_encode(delta, cfg, residual)
    use_feedback = cfg.scheme == "topk" and cfg.error_feedback
    if residual and not use_feedback:
        logger.debug("scheme %s without error feedback: the residual is ignored", cfg.scheme)
    if residual and use_feedback:
        extra = sorted(set(residual) - set(delta))
        if extra:
            raise CompressionError(f"residual for names not in the pseudo-gradient: {extra[:5]}")

    params: dict[str, Any] = {"scheme": cfg.scheme}
    if cfg.scheme == "int8":
        params["block_size"] = cfg.int8_block_size
    elif cfg.scheme == "topk":
        params.update(chunk=cfg.topk.chunk, density=cfg.topk.density, values="float16")

    tensors: dict[str, torch.Tensor] = {}
    topk_values: dict[str, torch.Tensor] = {}
    accumulated: dict[str, torch.Tensor] = {}
    for name, tensor in delta.items():
        if SEP in name:
            raise CompressionError(f"parameter name {name!r} contains the separator {SEP!r}")
        x = tensor.detach().to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise CompressionError(f"{name}: the pseudo-gradient holds non-finite values")
        if use_feedback and residual is not None and name in residual:
            previous = residual[name].to(device=x.device, dtype=torch.float32)
            if previous.shape != x.shape:
                raise CompressionError(
                    f"{name}: residual shape {tuple(previous.shape)} != {tuple(x.shape)}"
                )
            x = x + previous
        accumulated[name] = x
        if cfg.scheme == "none":
            tensors[name] = x.clone().contiguous()
        elif cfg.scheme == "fp16":
            if bool((x.abs() > FP16_MAX).any()):
                raise CompressionError(f"{name}: values beyond fp16's range (±{FP16_MAX:g})")
            tensors[name] = x.to(torch.float16).contiguous()
        elif cfg.scheme == "int8":
            q, scale = _int8_encode(x.reshape(-1), cfg.int8_block_size)
            tensors[f"{name}{SEP}q"], tensors[f"{name}{SEP}scale"] = q, scale
        else:
            idx, val = _topk_encode(x.reshape(-1), cfg.topk.chunk, cfg.topk.density)
            tensors[f"{name}{SEP}idx"] = idx
            topk_values[name] = val
    if cfg.scheme == "topk":
        # One value dtype for the whole payload: fp16 unless some kept value overflows it.
        wide = any(bool((v.abs() > FP16_MAX).any()) for v in topk_values.values())
        params["values"] = "float32" if wide else "float16"
        for name, val in topk_values.items():
            tensors[f"{name}{SEP}val"] = val.to(_VALUE_DTYPES[params["values"]])

    new_residual: dict[str, torch.Tensor] | None = None
    if use_feedback:
        shapes = {name: tuple(t.shape) for name, t in delta.items()}
        sent = decode(tensors, params, shapes)
        new_residual = {name: accumulated[name] - sent[name] for name in delta}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return Encoded(tensors=tensors, params=params, residual=new_residual, nbytes=nbytes)


def _sparseloco_encode(
    delta: Mapping[str, torch.Tensor],
    cfg: CompressionConfig,
    residual: Mapping[str, torch.Tensor] | None,
) -> Encoded:
    """The whole Δ as one SparseLoCo message; the residual is its error-feedback buffer."""
    for name, tensor in delta.items():
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise CompressionError(f"{name}: the pseudo-gradient holds non-finite values")
    spec = SparseSpec(chunk=cfg.sparseloco.chunk, k=cfg.sparseloco.k)
    feedback = sparseloco.ErrorFeedback(cfg.sparseloco.error_decay)
    feedback.residual = {
        n: t.detach().to("cpu", torch.float32) for n, t in (residual or {}).items()
    }
    try:
        sent = feedback.compress(delta, spec)
    except sparseloco.SparseLoCoError as exc:
        raise CompressionError(str(exc)) from None
    message = sent.message
    tensors = {f"{SPARSELOCO_KEY}{SEP}{key}": t for key, t in message.tensors.items()}
    params = {"scheme": "sparseloco", "chunk": spec.chunk, "k": spec.k}
    return Encoded(tensors, params, dict(sent.residual), message.nbytes)


# ---- decoding -----------------------------------------------------------------------------


def _check_tensors(tensors: Mapping[str, Any], specs: Mapping[str, Spec]) -> None:
    missing = sorted(set(specs) - set(tensors))
    unexpected = sorted(set(tensors) - set(specs))
    if missing or unexpected:
        raise CompressionError(
            f"payload tensor names do not match: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' …' if len(unexpected) > 5 else ''}"
        )
    for key, (dtype, shape) in specs.items():
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise CompressionError(f"{key}: not a tensor ({type(tensor).__name__})")
        if tensor.dtype != dtype:
            raise CompressionError(f"{key}: dtype {tensor.dtype}, expected {dtype}")
        if tuple(tensor.shape) != shape:
            raise CompressionError(f"{key}: shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompressionError(f"{key}: holds non-finite values")


def _int8_decode(q: torch.Tensor, scale: torch.Tensor, block: int, key: str) -> torch.Tensor:
    if bool((q == -INT8_MAX - 1).any()):
        raise CompressionError(f"{key}{SEP}q: -128 is outside the encoder's range [-127, 127]")
    if bool((scale < 0).any()):
        raise CompressionError(f"{key}{SEP}scale: negative scale")
    numel = q.numel()
    per_value = scale.repeat_interleave(block)[:numel]
    return q.to(torch.float32) * per_value


def _topk_decode(
    idx: torch.Tensor, val: torch.Tensor, numel: int, chunk_cfg: int, key: str
) -> torch.Tensor:
    chunk = _chunk(numel, chunk_cfg)
    rows = idx.shape[0]
    index = idx.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= chunk):
        raise CompressionError(f"{key}{SEP}idx: index outside [0, {chunk})")
    if index.shape[1] > 1 and not bool((index[:, 1:] > index[:, :-1]).all()):
        raise CompressionError(f"{key}{SEP}idx: indices within a chunk must strictly increase")
    flat = (index + torch.arange(rows, device=index.device)[:, None] * chunk).reshape(-1)
    values = val.to(torch.float32).reshape(-1)
    beyond = flat >= numel
    if bool((values[beyond] != 0).any()):
        raise CompressionError(f"{key}{SEP}val: nonzero value past the end of the tensor")
    out = torch.zeros(rows * chunk, dtype=torch.float32, device=val.device)
    out[flat] = values
    return out[:numel]


def decode(
    tensors: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    """The pseudo-gradient (fp32, shaped by the caller's `shapes`) from an untrusted payload.

    Raises `CompressionError` when the params, the tensor names (exactly those of
    `expected_specs(shapes, params)`), a dtype, a shape, an index or a value is wrong.
    """
    specs = expected_specs(shapes, params)
    _check_tensors(tensors, specs)
    scheme = params["scheme"]
    if scheme == "sparseloco":
        prefix = f"{SPARSELOCO_KEY}{SEP}"
        message = {key.removeprefix(prefix): t for key, t in tensors.items()}
        try:
            return sparseloco.decode(message, shapes, _sparse_spec(params))
        except sparseloco.SparseLoCoError as exc:
            raise CompressionError(f"{SPARSELOCO_KEY} message: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    for name, raw_shape in shapes.items():
        shape = tuple(int(d) for d in raw_shape)
        if scheme in ("none", "fp16"):
            out[name] = tensors[name].to(torch.float32).clone()
        elif scheme == "int8":
            q, scale = tensors[f"{name}{SEP}q"], tensors[f"{name}{SEP}scale"]
            out[name] = _int8_decode(q, scale, int(params["block_size"]), name).reshape(shape)
        else:
            idx, val = tensors[f"{name}{SEP}idx"], tensors[f"{name}{SEP}val"]
            flat = _topk_decode(idx, val, _numel(shape), int(params["chunk"]), name)
            out[name] = flat.reshape(shape)
    return out
