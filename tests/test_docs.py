"""The documents agree with the code, and the repository stands alone.

- Every repository path written in backticks in README.md and docs/architecture.md (and every
  relative link there) exists.
- docs/architecture.md names every module on the request path, and every ``Class.method`` or
  ``function()`` its request-life section cites is defined in a module that section names.
- No file of the repository points at material outside it (a folder next to the checkout, a
  design or origin document): the repository is self-contained.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
LIFE_HEADING = "## The life of one Generate request"

# The modules a Generate call passes through, in order (docs/architecture.md must name each in
# its request-life section).
REQUEST_PATH = (
    "omni_rpc/sdk/orchestrator.py",
    "coordinator/service.py",
    "coordinator/admission.py",
    "omni_rpc/validation.py",
    "coordinator/dispatch.py",
    "coordinator/balancer.py",
    "coordinator/registry.py",
    "coordinator/strategies/base.py",
    "coordinator/strategies/round_robin.py",
    "coordinator/strategies/least_loaded.py",
    "coordinator/strategies/power_of_two.py",
    "coordinator/strategies/cache_aware.py",
    "coordinator/strategies/consistent_hash.py",
    "coordinator/prefix.py",
    "coordinator/node_client_grpc.py",
    "node_agent/service.py",
    "node_agent/engine.py",
    "node_agent/engines/sim.py",
    "node_agent/engines/vllm.py",
)
# The rest of the architecture: membership, health, the network boundary, time.
ALSO_NAMED = (
    "coordinator/node_client.py",
    "coordinator/health.py",
    "coordinator/circuit.py",
    "coordinator/clock.py",
    "node_agent/membership.py",
    "omni_rpc/launchers/__init__.py",
    "tests/unit/fakes.py",
    "tests/unit/clock.py",
)

PATH_SUFFIXES = (".py", ".proto", ".md", ".yaml")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_QUALIFIED = re.compile(r"[A-Z][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
_CALL = re.compile(r"([a-z_][A-Za-z0-9_]*)\(\)")


# -- helpers ---------------------------------------------------------------------------------


def inline_code(markdown: str) -> list[str]:
    """The backticked spans of ``markdown``, fenced code blocks left out."""
    return _INLINE_CODE.findall(_FENCE.sub("", markdown))


def path_like(span: str) -> bool:
    """Whether a backticked span is a repository path: ``coordinator/dispatch.py``,
    ``deploy/kubernetes/``, ``README.md``. Not flags, URLs, absolute paths, hidden folders
    (``.venv/bin``) or gRPC names (``omni.v1.Coordinator/Generate``)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.*/-]*", span) or "//" in span:
        return False
    if "/" in span:
        return "." not in span.split("/", 1)[0]
    return span.endswith(PATH_SUFFIXES)


def missing_paths(markdown: str, base: Path) -> list[str]:
    """Backticked repository paths (relative to ROOT) and relative links (relative to
    ``base``) of ``markdown`` that do not exist."""
    missing = []
    for span in inline_code(markdown):
        if path_like(span):
            exists = any(ROOT.glob(span.rstrip("/"))) if "*" in span else (ROOT / span).exists()
            if not exists:
                missing.append(span)
    for target in _LINK.findall(_FENCE.sub("", markdown)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (base / target.split("#", 1)[0]).exists():
            missing.append(target)
    return missing


def section(markdown: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    start = markdown.index(heading + "\n") + len(heading) + 1
    end = markdown.find("\n" + level + " ", start)
    return markdown[start:] if end < 0 else markdown[start:end]


def list_items(text: str) -> list[str]:
    """The numbered list items of ``text``, each with its continuation lines."""
    return [m.group(0) for m in re.finditer(r"^\d+\. .*?(?=^\d+\. |^\S|\Z)", text, re.M | re.S)]


@cache
def definitions(module: str) -> frozenset[str]:
    """Top-level functions and classes of a module, and ``Class.method`` for each method."""
    tree = ast.parse((ROOT / module).read_text(), module)
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(f"{node.name}.{member.name}")
    return frozenset(names)


def cited_names(text: str) -> Iterator[str]:
    """``Class.method`` and ``function`` (written ``function()``) cited in backticks."""
    for span in inline_code(text):
        if _QUALIFIED.fullmatch(span):
            yield span
        elif call := _CALL.fullmatch(span):
            yield call.group(1)


def modules_in(text: str) -> list[str]:
    return [s for s in inline_code(text) if s.endswith(".py") and (ROOT / s).is_file()]


def undefined_citations(life: str) -> list[str]:
    """Names cited in the request-life section that are not defined where it says.

    A numbered step's names must be defined in a module named in that step; names elsewhere
    in the section, in a module named anywhere in the section.
    """
    wrong = []
    items = list_items(life)
    for item in items:
        known = set().union(*(definitions(m) for m in modules_in(item)))
        wrong += [f"{n} (step: {item[:40]!r})" for n in cited_names(item) if n not in known]
    rest = life
    for item in items:
        rest = rest.replace(item, "")
    known = set().union(*(definitions(m) for m in modules_in(life)))
    wrong += [f"{n} (outside the steps)" for n in cited_names(rest) if n not in known]
    return wrong


# Wording that sends a reader outside the repository. Built from pieces so that this file, which
# is scanned as well, does not match itself.
_OUTSIDE_LITERALS = (".." + "/shared", "shared" + "/seed", "DESIGN" + ".md")
_OUTSIDE_PHRASES = re.compile(r"\bthe\s+seed\b|\bseed\s+document|\bseed['\u2019]s\b", re.IGNORECASE)
# Files that hold such a string as the thing they check for.
_CHECKERS = {"tests/test_protos.py": {"DESIGN" + ".md"}}


def outside_references(text: str) -> list[str]:
    found = [literal for literal in _OUTSIDE_LITERALS if literal in text]
    found += [m.group(0) for m in _OUTSIDE_PHRASES.finditer(text)]
    return found


def repository_files() -> list[str]:
    """Tracked files, and new ones git does not ignore."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sorted({p for p in listed.decode().split("\0") if p})


def text_of(path: Path) -> str | None:
    """The file's text, or None for binary files and files that are gone."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- the checks on the matchers themselves ----------------------------------------------------


def test_path_matcher() -> None:
    assert path_like("coordinator/dispatch.py")
    assert path_like("deploy/kubernetes/")
    assert path_like("README.md")
    assert path_like("protos/omni/v1/*.proto")
    for not_a_path in (
        "omni.v1.Coordinator/Generate",
        "grpc.health.v1",
        ".venv/bin",
        "/metrics",
        "--tls-cert/--tls-key",
        "ray://head-node:10001",
        "round_robin",
        "Dispatcher.generate",
    ):
        assert not path_like(not_a_path), not_a_path
    text = "See `coordinator/dispatch.py`, `omni_rpc/nowhere.py` and [x](nowhere.md).\n"
    text += "```\n`omni_rpc/in_a_fence.py`\n```\n"
    assert missing_paths(text, ROOT) == ["omni_rpc/nowhere.py", "nowhere.md"]


def test_citation_matcher() -> None:
    life = (
        "1. `coordinator/dispatch.py`: `Dispatcher.generate`, `Dispatcher.no_such_method`,\n"
        "   `classify()` and `Balancer.pick` (not defined here), `RESOURCE_EXHAUSTED`.\n"
        "2. `coordinator/balancer.py`: `Balancer.pick`.\n"
        "\n"
        "Back: `Dispatcher._relay`, `Nowhere.method`, `context.time_remaining()`.\n"
    )
    wrong = undefined_citations(life)
    assert [w.split(" ")[0] for w in wrong] == [
        "Dispatcher.no_such_method",
        "Balancer.pick",
        "Nowhere.method",
    ]


def test_outside_reference_matcher() -> None:
    for bad in (
        "as in the " + "seed",
        "The  Se" + "ed's keys",
        "the\nseed",
        "a se" + "ed document's table",
        "see .." + "/shared/x",
        "DESIGN" + ".md",
    ):
        assert outside_references(bad), bad
    for fine in (
        "seed=42",
        "a sampling seed",
        "--seed 7",
        "the " + "seeded order",
        "request i depends only on the run's seed",
        "random.Random(f'chaos-load-{seed}')",
        "test_raycluster_matches_the_image",
    ):
        assert not outside_references(fine), fine


# -- the documents ------------------------------------------------------------------------------


@pytest.mark.parametrize("document", ["README.md", "docs/architecture.md"])
def test_paths_in_the_documents_exist(document: str) -> None:
    path = ROOT / document
    assert missing_paths(path.read_text(), path.parent) == []


def test_architecture_names_the_request_path_and_the_rest() -> None:
    text = ARCHITECTURE.read_text()
    life = section(text, LIFE_HEADING)
    named = set(inline_code(life))
    assert [m for m in REQUEST_PATH if m not in named] == []
    everywhere = set(inline_code(text))
    assert [m for m in ALSO_NAMED if m not in everywhere] == []


def test_functions_cited_in_the_request_life_exist() -> None:
    life = section(ARCHITECTURE.read_text(), LIFE_HEADING)
    # Guards the parsing: the steps are found and they cite names.
    assert len(list_items(life)) >= 8
    assert len(list(cited_names(life))) >= 30
    assert undefined_citations(life) == []


def test_the_repository_points_nowhere_outside_itself() -> None:
    found = []
    for name in repository_files():
        text = text_of(ROOT / name)
        if text is None:
            continue
        allowed = _CHECKERS.get(name, set())
        here = []
        for line_number, line in enumerate(text.splitlines(), 1):
            hits = [h for h in outside_references(line) if h not in allowed]
            if hits:
                here.append(f"{name}:{line_number}: {', '.join(hits)}")
        if not here:
            # A phrase broken across lines: one word at the end of a line, the next below.
            hits = [h for h in outside_references(" ".join(text.split())) if h not in allowed]
            if hits:
                here.append(f"{name}: {', '.join(hits)}")
        found += here
    assert found == []
