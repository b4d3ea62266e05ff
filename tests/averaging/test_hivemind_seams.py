"""Every hivemind name and signature that `averaging/` relies on, pinned to hivemind 1.1.12.

    .venv/bin/python -m pytest -q tests/averaging/test_hivemind_seams.py

We extend hivemind through names it does not promise to keep: private methods we override
(`AllReduceRunner._communicate_with_peer`, `DecentralizedAverager._aggregate_with_group`…),
attributes its classes set in `__init__` (`TensorPartContainer._input_parts_by_peer`…),
and the places where hivemind calls our overrides. They are all listed here, in one place.
A hivemind upgrade that renames or drops one, renames a parameter of a method we override,
or stops calling an override from where we expect fails here, naming the entry, instead of
as a hung round between real peers.

`test_every_hivemind_name_we_use_is_listed` keeps the list whole: a new override, or a new
``self.<name>`` inside one of our subclasses that resolves to hivemind, fails until it is
listed. Only `inspect` and the AST: no DHT, no process.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import hivemind
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import Matchmaking, PotentialLeaders
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer
from hivemind.compression import CompressionBase, Uniform8BitQuantization
from hivemind.compression.quantization import Quantization, average_buckets
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.p2pclient import Client
from hivemind.proto import averaging_pb2
from hivemind.utils.mpfuture import MPFuture

import averaging
from averaging.allgather import GatherAverager
from averaging.allreduce import LedgerAllReduceRunner
from averaging.averager import LedgerAverager
from averaging.dht import IdentityRecordValidator
from averaging.matchmaking import LedgerMatchmaking, _WindowKeyManager
from averaging.records import PeerRecordValidator
from averaging.reducer import LedgerPartReducer
from averaging.wire import SparseCodec, Uniform8BitCodec

HIVEMIND_VERSION = "1.1.12"

# Every module of ours that imports hivemind; the completeness scan reads them all.
MODULES = tuple(
    importlib.import_module(f"averaging.{path.stem}")
    for path in sorted(Path(averaging.__file__).parent.glob("*.py"))
    if path.stem != "__init__" and "hivemind" in path.read_text()
)


class Override(NamedTuple):
    ours: type
    base: type  # the hivemind class whose method we replace
    name: str
    params: str  # hivemind's parameter names, as we wrote the override against them


OVERRIDES = (
    Override(LedgerPartReducer, TensorPartReducer, "__init__", "self part_shapes num_senders"),
    Override(LedgerPartReducer, TensorPartReducer, "reset_accumulators", "self"),
    Override(
        LedgerPartReducer,
        TensorPartReducer,
        "accumulate_part",
        "self sender_index part_index tensor_part weight",
    ),
    Override(LedgerPartReducer, TensorPartReducer, "check_current_part_finished", "self"),
    Override(LedgerPartReducer, TensorPartReducer, "finalize", "self"),
    Override(
        LedgerAllReduceRunner,
        AllReduceRunner,
        "__init__",
        """self p2p servicer_type prefix group_id tensors weight ordered_peer_ids peer_fractions
        modes sender_timeout reducer_timeout kwargs""",
    ),
    Override(LedgerAllReduceRunner, AllReduceRunner, "_generate_input_for_peer", "self peer_index"),
    Override(LedgerAllReduceRunner, AllReduceRunner, "_communicate_with_peer", "self peer_id"),
    Override(LedgerAllReduceRunner, AllReduceRunner, "rpc_aggregate_part", "self stream context"),
    Override(
        LedgerAllReduceRunner,
        AllReduceRunner,
        "_accumulate_parts_streaming",
        "self stream sender_index",
    ),
    # hivemind 1.1.12 never calls it; a version that reshuffles group bits after each group
    # would, and would scatter a window's retry over several keys.
    Override(
        _WindowKeyManager, GroupKeyManager, "update_key_on_group_assembled", "self group_info"
    ),
    Override(
        LedgerMatchmaking,
        Matchmaking,
        "__init__",
        """self p2p schema_hash dht servicer_type prefix target_group_size min_group_size
        min_matchmaking_time request_timeout client_mode initial_group_bits""",
    ),
    Override(LedgerMatchmaking, Matchmaking, "_check_reasons_to_reject", "self request context"),
    Override(LedgerMatchmaking, Matchmaking, "_request_join_group", "self leader"),
    Override(LedgerMatchmaking, Matchmaking, "follower_assemble_group", "self leader msg"),
    Override(
        LedgerAverager,
        DecentralizedAverager,
        "__init__",
        """self averaged_tensors dht start prefix target_group_size min_group_size
        initial_group_bits min_matchmaking_time request_timeout averaging_alpha part_size_bytes
        allreduce_timeout next_chunk_timeout sender_timeout reducer_timeout compression
        state_compression tensor_infos bandwidth min_vector_size auxiliary allow_state_sharing
        declare_state_period client_mode daemon shutdown_timeout""",
    ),
    Override(LedgerAverager, DecentralizedAverager, "_get_handle_name", "namespace method_name"),
    Override(
        LedgerAverager, DecentralizedAverager, "run_in_background", "self await_ready timeout"
    ),
    Override(LedgerAverager, DecentralizedAverager, "run", "self"),
    Override(LedgerAverager, DecentralizedAverager, "_shutdown", "self timeout"),
    # hivemind's, but awaiting the group's runner through a shield (a sender that hangs up
    # must not cancel the group's future for everyone).
    Override(LedgerAverager, DecentralizedAverager, "rpc_aggregate_part", "self stream context"),
    Override(LedgerAverager, DecentralizedAverager, "get_current_state", "self"),
    Override(
        LedgerAverager,
        DecentralizedAverager,
        "_aggregate_with_group",
        "self group_info min_vector_size kwargs",
    ),
    Override(
        LedgerAverager,
        DecentralizedAverager,
        "_run_allreduce_inplace_",
        "self tensors group_info group_id kwargs",
    ),
    Override(
        GatherAverager,
        DecentralizedAverager,
        "__init__",
        """self averaged_tensors dht start prefix target_group_size min_group_size
        initial_group_bits min_matchmaking_time request_timeout averaging_alpha part_size_bytes
        allreduce_timeout next_chunk_timeout sender_timeout reducer_timeout compression
        state_compression tensor_infos bandwidth min_vector_size auxiliary allow_state_sharing
        declare_state_period client_mode daemon shutdown_timeout""",
    ),
    Override(
        GatherAverager,
        DecentralizedAverager,
        "_aggregate_with_group",
        "self group_info min_vector_size kwargs",
    ),
    Override(SparseCodec, CompressionBase, "compress", "self tensor info allow_inplace"),
    Override(SparseCodec, CompressionBase, "extract", "self serialized_tensor"),
    Override(SparseCodec, CompressionBase, "estimate_compression_ratio", "self info"),
    Override(Uniform8BitCodec, Uniform8BitQuantization, "quantize", "self tensor allow_inplace"),
    Override(Uniform8BitCodec, Uniform8BitQuantization, "extract", "self serialized_tensor"),
    Override(IdentityRecordValidator, RecordValidatorBase, "validate", "self record"),
    Override(PeerRecordValidator, RecordValidatorBase, "validate", "self record"),
    Override(PeerRecordValidator, RecordValidatorBase, "sign_value", "self record"),
    Override(PeerRecordValidator, RecordValidatorBase, "strip_value", "self record"),
    Override(PeerRecordValidator, RecordValidatorBase, "priority", "self"),
    Override(PeerRecordValidator, RecordValidatorBase, "merge_with", "self other"),
)

# Attributes and methods of hivemind objects that we read, write or call besides the
# overrides above: set by hivemind's `__init__` (or another method), or class members.
ATTRIBUTES: dict[type, str] = {
    TensorPartReducer: """part_shapes num_senders num_parts current_part_index
        current_part_accumulated_from current_part_future finished num_parts_received
        sender_failed_after num_current_senders""",
    # Reached through `runner.tensor_part_container`, which the scan below cannot see.
    TensorPartContainer: """_input_parts_by_peer num_parts_by_peer prefetch return_deltas
        register_processed_part register_failed_reducer""",
    AllReduceRunner: """peer_id group_id ordered_peer_ids sender_peer_ids tensor_part_container
        tensor_part_reducer parts_for_local_averaging reducer_timeout banned_senders
        should_delay_results _get_peer_stub _ban_sender""",
    # The replaced key manager's, read to build ours; group bits are set per round.
    GroupKeyManager: "dht prefix group_bits target_group_size",
    Matchmaking: "group_key_manager potential_leaders target_group_size",
    PotentialLeaders: "target_group_size",
    # `averaging.allgather` adds an RPC handler; hivemind caches them per class.
    ServicerBase: "get_stub remove_p2p_handlers _rpc_handlers",
    DecentralizedAverager: """dht prefix peer_id client_mode schema_hash matchmaking_kwargs
        total_size get_tensors step shutdown wait_until_ready allow_state_sharing
        state_sharing_priority rpc_download_state _averaged_tensors _running_groups
        _outer_pipe _p2p _matchmaking _pending_groups_registered""",
    Quantization: "n_bins indices_dtype codebook_dtype",
    Uniform8BitQuantization: "RANGE_IN_SIGMAS",
    CompressionBase: "compression_type",
    # `averaging.dht` dials a peer through the DHT node's daemon client (no public call).
    P2P: "_client list_peers",
    Client: "connect",
    DHTProtocol: "RESERVED_SUBKEYS call_ping",
    MPFuture: "reset_backend",
}

# Keyword arguments we pass into hivemind callables: each must still be a parameter.
CALLS: tuple[tuple[Callable[..., Any], str], ...] = (
    (
        DecentralizedAverager.__init__,
        """averaged_tensors dht start prefix target_group_size min_group_size
        min_matchmaking_time request_timeout allreduce_timeout sender_timeout reducer_timeout
        compression part_size_bytes bandwidth allow_state_sharing declare_state_period
        shutdown_timeout""",
    ),
    (DecentralizedAverager.step, "gather scheduled_time timeout allow_retries wait"),
    # Our runner's keywords, and hivemind's `allreduce_kwargs` that `_step` hands through
    # `_aggregate_with_group` and `_run_allreduce_inplace_` to the runner and its container.
    (
        AllReduceRunner.__init__,
        """p2p servicer_type prefix tensors group_id ordered_peer_ids peer_fractions weight
        sender_timeout reducer_timeout""",
    ),
    (TensorPartContainer.__init__, "compression part_size_bytes tensor_infos"),
    (TensorPartContainer.register_processed_part, "peer_index part_index part"),
    (TensorPartContainer.register_failed_reducer, "peer_index"),
    (GroupKeyManager.__init__, "dht prefix initial_group_bits target_group_size"),
    (Matchmaking.__init__, "p2p schema_hash dht client_mode"),
    (ServicerBase.get_stub, "p2p peer namespace"),
    (ServicerBase.remove_p2p_handlers, "p2p namespace"),
    (load_balance_peers, "vector_size bandwidths min_size"),
    (average_buckets, "tensor quant_weight n_bins"),
    (Client.connect, "peer_id maddrs"),
)

# Where hivemind calls what we override or rely on: (hivemind function, a fragment of its
# source). A fragment that disappears means our override may no longer be called there.
CALLERS: tuple[tuple[Callable[..., Any], str], ...] = (
    (TensorPartReducer.__init__, "self.reset_accumulators()"),
    (TensorPartReducer.on_sender_failed, "self.check_current_part_finished()"),
    (AllReduceRunner.run, "self._communicate_with_peer(peer_id)"),
    (AllReduceRunner.run, "self.tensor_part_container.iterate_output_tensors()"),
    (AllReduceRunner.rpc_aggregate_part, "self._accumulate_parts_streaming("),
    (AllReduceRunner._ban_sender, "self.tensor_part_reducer.on_sender_failed("),
    (TensorPartContainer.register_failed_reducer, "if self.return_deltas else"),
    (Matchmaking.rpc_join_group, "self._check_reasons_to_reject(request, context)"),
    (Matchmaking._request_join_potential_leaders, "self._request_join_group(next_leader)"),
    (Matchmaking._request_join_group, "self.follower_assemble_group(leader, message)"),
    # The control pipe: ("_method", args, kwargs) runs `self._method(...)` as a task in the
    # averager's process (`configure_round`, `set_commitments`, ...).
    (DecentralizedAverager._run_internal, "getattr(self, method)(*args, **kwargs)"),
    (DecentralizedAverager._step, "self._aggregate_with_group("),
    (DecentralizedAverager._step, "**self.allreduce_kwargs"),
    (DecentralizedAverager.rpc_aggregate_part, "self._running_groups.get(request.group_id)"),
    (DecentralizedAverager.rpc_download_state, "self._get_current_state_from_host_process()"),
    # `averaging.gather.parse_gather` reads hivemind's wrapping of the gathered data.
    (DecentralizedAverager.step, "[self.bandwidth, self.mode.value, user_data_for_gather]"),
    # `LedgerAverager._download_state` reads the DHT key that state sharers declare.
    (DecentralizedAverager._declare_for_download_periodically, '.all_averagers"'),
    (ServicerBase.add_p2p_handlers, "self._get_handle_name(namespace, handler.method_name)"),
    # A streaming handler is told by its `typing.AsyncIterator` annotation (`rpc_tm_fetch`).
    (ServicerBase._strip_iterator_hint, 'hint._name in ("AsyncIterator", "AsyncIterable")'),
    # The group's runner future, which `GatherAverager` cancels (it runs no butterfly).
    (DecentralizedAverager._register_allreduce_group, "self._running_groups[group_info.group_id]"),
    (Quantization.compress, "self.quantize("),
)


def _hivemind_classes(cls: type) -> list[type]:
    return [c for c in cls.__mro__ if c.__module__.startswith("hivemind.")]


@functools.cache
def _source(obj: Any) -> str:
    return textwrap.dedent(inspect.getsource(obj))


def _assigned(cls: type, name: str) -> bool:
    """Whether hivemind's source of `cls` or of its hivemind bases assigns ``self.<name>``."""
    pattern = re.compile(rf"\bself\.{re.escape(name)}\b[\w\s.,]*(:[^=\n]*)?=(?!=)")
    return any(pattern.search(_source(c)) for c in _hivemind_classes(cls))


def _hivemind_has(cls: type, name: str) -> bool:
    """Whether hivemind's `cls` (or a hivemind base) defines, declares or assigns `name`."""
    return _assigned(cls, name) or any(
        name in vars(c) or name in vars(c).get("__annotations__", {})
        for c in _hivemind_classes(cls)
    )


def _function(member: Any) -> Any:
    if isinstance(member, property):
        return member.fget
    if isinstance(member, classmethod | staticmethod):
        return member.__func__
    return member


def _signature(cls: type, name: str) -> inspect.Signature:
    if isinstance(inspect.getattr_static(cls, name), classmethod):
        return inspect.signature(getattr(cls, name))  # without `cls`, as it is called
    return inspect.signature(_function(inspect.getattr_static(cls, name)))


def _cannot_take(ours: inspect.Signature, theirs: inspect.Signature) -> list[str]:
    """hivemind's parameters that our override cannot take the way hivemind passes them."""
    kind = inspect.Parameter
    mine = list(ours.parameters.values())
    positional = [
        p.name for p in mine if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)
    ]
    by_name = {p.name: p.kind for p in mine}
    var_pos = kind.VAR_POSITIONAL in by_name.values()
    var_kw = kind.VAR_KEYWORD in by_name.values()
    missing = []
    for i, p in enumerate(theirs.parameters.values()):
        if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD):
            ok = (i < len(positional) and positional[i] == p.name) or (var_pos and var_kw)
        elif p.kind is kind.KEYWORD_ONLY:
            ok = var_kw or by_name.get(p.name) in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)
        else:
            ok = var_pos if p.kind is kind.VAR_POSITIONAL else var_kw
        if not ok:
            missing.append(p.name)
    return missing


def test_hivemind_version_is_the_one_this_list_was_checked_against() -> None:
    assert hivemind.__version__ == HIVEMIND_VERSION, (
        f"hivemind {hivemind.__version__} is installed; averaging/ extends hivemind "
        f"{HIVEMIND_VERSION} through the private names listed in {__file__}. Re-check every "
        "entry (and the overrides it names) against the new version, then update the pin."
    )


@pytest.mark.parametrize("o", OVERRIDES, ids=lambda o: f"{o.ours.__name__}.{o.name}")
def test_overridden_method_keeps_its_signature(o: Override) -> None:
    assert o.name in vars(o.ours), f"{o.ours.__name__} no longer overrides {o.name}: drop it"
    assert hasattr(o.base, o.name), f"hivemind's {o.base.__name__} has no {o.name} any more"
    theirs = _signature(o.base, o.name)
    assert list(theirs.parameters) == o.params.split(), (
        f"hivemind's {o.base.__name__}.{o.name} now takes {list(theirs.parameters)}; "
        f"our override was written against {o.params.split()}"
    )
    if o.name != "__init__":  # hivemind calls the others on our objects
        ours = _signature(o.ours, o.name)
        assert not _cannot_take(ours, theirs), (
            f"{o.ours.__name__}.{o.name}{ours} cannot take {_cannot_take(ours, theirs)} "
            f"as hivemind's {o.base.__name__}.{o.name}{theirs} is called"
        )
    mine = _function(inspect.getattr_static(o.ours, o.name))
    base = _function(inspect.getattr_static(o.base, o.name))
    for is_kind in (inspect.iscoroutinefunction, inspect.isasyncgenfunction):
        assert is_kind(mine) == is_kind(base), f"{o.name}: {is_kind.__name__} differs"


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls, names in ATTRIBUTES.items() for name in names.split()],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_attribute_we_use_still_exists(cls: type, name: str) -> None:
    assert hasattr(cls, name) or _hivemind_has(cls, name), (
        f"hivemind's {cls.__name__} no longer has {name}"
    )


@pytest.mark.parametrize(("function", "names"), CALLS, ids=[f.__qualname__ for f, _ in CALLS])
def test_keywords_we_pass_are_still_parameters(function: Callable[..., Any], names: str) -> None:
    params = inspect.signature(function).parameters
    gone = [n for n in names.split() if n not in params]
    assert not gone, f"hivemind's {function.__qualname__} no longer takes {gone}"


@pytest.mark.parametrize(
    ("function", "fragment"), CALLERS, ids=[f.__qualname__ for f, _ in CALLERS]
)
def test_hivemind_still_calls_us_where_we_expect(
    function: Callable[..., Any], fragment: str
) -> None:
    assert fragment in _source(function), (
        f"hivemind's {function.__qualname__} no longer contains {fragment!r}: check that what "
        "we override or read there is still used that way"
    )


def test_handle_names_match_hivemind_for_every_subclass() -> None:
    """Peers find each other's RPC handlers by name: a subclass (tests' fault injection)
    must register and call the names of a plain `LedgerAverager`, as hivemind builds them."""
    subclass = type("FaultyAverager", (LedgerAverager,), {})
    for namespace in (None, "run_shard0"):
        want = ServicerBase._get_handle_name.__func__(LedgerAverager, namespace, "rpc_join_group")
        assert subclass._get_handle_name(namespace, "rpc_join_group") == want
        assert LedgerAverager._get_handle_name(namespace, "rpc_join_group") == want


def test_the_reply_field_that_carries_the_contributor_bitmaps_is_still_bytes() -> None:
    fields = averaging_pb2.AveragingData.DESCRIPTOR.fields_by_name
    assert {"code", "group_id", "tensor_part", "weight", "peer_id"} <= set(fields)
    assert fields["peer_id"].type == FieldDescriptor.TYPE_BYTES
    assert {"tensor_part", "metadata"} <= set(averaging_pb2.DownloadData.DESCRIPTOR.fields_by_name)
    for code in ("PART_FOR_AVERAGING", "AVERAGED_PART", "PROTOCOL_VIOLATION"):
        averaging_pb2.MessageCode.Value(code)  # ValueError once it is gone


def _our_hivemind_subclasses() -> list[type]:
    return [
        cls
        for module in MODULES
        for cls in vars(module).values()
        if isinstance(cls, type) and cls.__module__ == module.__name__ and _hivemind_classes(cls)
    ]


def _self_names(cls: type) -> tuple[set[str], set[str]]:
    """(methods defined in the class body, names read or written as ``self.<name>``)."""
    body = ast.parse(_source(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    methods = {n.name for n in body.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    used = {
        node.attr
        for node in ast.walk(body)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("self", "cls")
    }
    return methods, used


def _defined_by_us(name: str) -> bool:
    """Whether a module or class of ours defines `name`, or assigns it to ``self``."""
    assign = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=(?!=)")
    return any(
        name in vars(module)
        or any(name in vars(c) for c in vars(module).values() if isinstance(c, type))
        or assign.search(_source(module))
        for module in MODULES
    )


def test_every_hivemind_name_we_use_is_listed() -> None:
    """What our hivemind subclasses override or use as ``self.<name>`` from hivemind, and
    every private ``x._name`` that our modules reach on another object, is listed above."""
    overridden = {(o.ours, o.name) for o in OVERRIDES}
    listed = {n for names in ATTRIBUTES.values() for n in names.split()}
    listed |= {o.name for o in OVERRIDES}
    unlisted = []
    for cls in _our_hivemind_subclasses():
        bases = _hivemind_classes(cls)
        methods, used = _self_names(cls)
        for name in sorted(methods):
            if any(name in vars(base) for base in bases) and (cls, name) not in overridden:
                unlisted.append(f"{cls.__name__}.{name} overrides hivemind's")
        for name in sorted(used - methods - listed):
            ours = any(name in vars(c) for c in cls.__mro__ if c.__module__.startswith("averaging"))
            if not ours and any(_hivemind_has(base, name) for base in bases):
                unlisted.append(f"{cls.__name__} uses hivemind's self.{name}")
    for module in MODULES:
        for node in ast.walk(ast.parse(_source(module))):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            owner = node.value
            on_self = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
            on_super = isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "super"
            if node.attr.startswith("__") or on_self or on_super or node.attr in listed:
                continue
            if not _defined_by_us(node.attr):
                unlisted.append(f"{module.__name__} reaches {ast.unparse(node)}")
    assert not unlisted, "list these in tests/averaging/test_hivemind_seams.py:\n" + "\n".join(
        unlisted
    )
