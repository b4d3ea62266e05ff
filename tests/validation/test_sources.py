"""Where miners keep their contributions: the commitment key, parsed as untrusted input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from store.config import REPO_ID
from store.sources import MAX_LOCATION_CHARS, contributions_entry, parse_contributions_location


def commitment(location: object, **other: object) -> str:
    return json.dumps({"dht": ["/ip4/127.0.0.1/tcp/1/p2p/Qm"], **other, "contributions": location})


@pytest.mark.parametrize(
    ("location", "want"),
    [
        ("my-org/tensormine-contributions", "my-org/tensormine-contributions"),
        ("datasets/miner_7/contrib.v2", "datasets/miner_7/contrib.v2"),
        ("models/org/name", "org/name"),
    ],
)
def test_hub_locations(location: str, want: str) -> None:
    assert parse_contributions_location(commitment(location), backend="hub") == want
    assert contributions_entry(location) == {"contributions": location}


@pytest.mark.parametrize(
    "location",
    [
        "",
        "org",
        "org/name/extra",
        "hf://org/name",
        "https://huggingface.co/org/name",
        "org/name@main",
        "../org/name",
        "org/..name",
        "org/na--me",
        "-org/name",
        "org/name ",
        "spaces/org/name",
        "datasets/org",
        "org/" + "n" * 200,
        "/abs/path/store",
    ],
)
def test_bad_hub_locations_are_none(location: str) -> None:
    assert parse_contributions_location(commitment(location), backend="hub") is None


def test_hub_pattern_agrees_with_the_store_config() -> None:
    for repo in ("a/b", "my-org/x.y_z", "A1/b-2"):
        assert REPO_ID.match(repo)
        assert parse_contributions_location(commitment(repo), backend="hub") == repo


def test_local_locations(tmp_path: Path) -> None:
    root = str(tmp_path.resolve() / "miner-3" / "store")
    assert parse_contributions_location(commitment(root), backend="local") == root
    for bad in [
        "runs/demo/store",  # relative: would resolve against the validator's directory
        "./store",
        "/a/../etc",
        "/a/./b",
        "/a//b",
        "/a/b/",
        "//host/share",
        "/",
        "~/store",
        "/a/~/b",
        "/a/b\n",
        "/a/\x00b",
        "/" + "x" * MAX_LOCATION_CHARS,
        "my-org/name",
    ]:
        assert parse_contributions_location(commitment(bad), backend="local") is None, bad


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '"org/name"',
        json.dumps({"dht": []}),
        json.dumps({"contributions": 7}),
        json.dumps({"contributions": ["org/name"]}),
        json.dumps({"contributions": None}),
        "{" * 100_000,
    ],
)
def test_commitments_without_a_valid_location_are_none(text: str) -> None:
    assert parse_contributions_location(text, backend="hub") is None
    assert parse_contributions_location(text, backend="local") is None


def test_entry_refuses_what_no_validator_accepts_and_backend_must_be_known() -> None:
    with pytest.raises(ValueError):
        contributions_entry("relative/path/that/is/long")
    with pytest.raises(ValueError):
        contributions_entry("x" * 300)
    with pytest.raises(ValueError):
        parse_contributions_location(commitment("org/name"), backend="s3")
