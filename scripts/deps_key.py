"""Print the dependency spec of pyproject.toml (``--requirements``) or a short hash of it.

The hash keys the cached virtual environment: the environment is rebuilt only when the
dependencies change, not when any other part of the project does.
"""

from __future__ import annotations

import hashlib
import sys
import tomllib
from pathlib import Path

EXTRAS = ("dev", "test")


def requirements() -> list[str]:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += [r for r in project["optional-dependencies"].get(extra, []) if "omni-rpc" not in r]
    return reqs


def main() -> None:
    reqs = requirements()
    if sys.argv[1:] == ["--requirements"]:
        print("\n".join(reqs))
        return
    spec = "\n".join([f"python {sys.version_info.major}.{sys.version_info.minor}", *reqs])
    print(hashlib.sha256(spec.encode()).hexdigest()[:16])


if __name__ == "__main__":
    main()
