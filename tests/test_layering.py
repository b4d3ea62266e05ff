"""Dependencies point one way (shared/DESIGN.md): `common` imports no package of ours,
`chain` never imports torch (nor any package above it), whichever backend is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

PACKAGES = ("tensormine", "chain", "store", "train", "averaging", "validation", "subnet")


def loaded_after(*modules: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after importing `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout))


def test_common_imports_none_of_the_packages() -> None:
    loaded = loaded_after("common.errors", "common.schema", "common.cli", "common.tracking")
    assert not loaded & set(PACKAGES), loaded & set(PACKAGES)


def test_chain_never_imports_torch_or_the_packages_above_it() -> None:
    library = ("chain.factory", "chain.local", "chain.bittensor", "chain.wallet", "chain.copier")
    loaded = loaded_after(*library)
    assert "torch" not in loaded
    above = {"tensormine", "train", "averaging", "validation", "subnet", "store"}
    assert not loaded & above, loaded & above
    # Its command line reads a whole run config (every section's schema), still no torch.
    assert "torch" not in loaded_after("chain.cli")


def test_the_command_line_starts_without_torch() -> None:
    """`tensormine chain run` (the block producer every end-to-end test starts, several
    times in some) and every other command parse their arguments without loading torch
    (1.7 s of imports); the commands that need it import it when they run."""
    code = (
        "import sys\n"
        "from tensormine.cli import build_parser\n"
        "build_parser()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
