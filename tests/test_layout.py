"""The architecture the code promises: one bridge between asyncio and trio."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    path
    for package in ("actors", "broker", "benchmarks")
    for path in (ROOT / package).rglob("*.py")
)
BRIDGE = ROOT / "actors" / "bridge.py"


def imports(path: Path, module: str) -> bool:
    pattern = rf"^\s*(import {module}\b|from {module}\b)"
    return re.search(pattern, path.read_text(), flags=re.MULTILINE) is not None


def test_nothing_imports_trio_asyncio():
    offenders = [path for path in SOURCES if imports(path, "trio_asyncio")]
    assert offenders == []


def test_only_the_bridge_touches_both_asyncio_and_trio():
    both = [
        path.relative_to(ROOT)
        for path in SOURCES
        if path != BRIDGE and imports(path, "asyncio") and imports(path, "trio")
    ]
    assert both == []


def test_the_actor_runtime_knows_nothing_of_webrtc():
    for path in (ROOT / "actors").rglob("*.py"):
        for module in ("aiortc", "aioice", "asyncssh", "broker"):
            assert not imports(path, module), f"{path.name} imports {module}"
