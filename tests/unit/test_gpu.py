"""The agent's GPU description, with a stand-in nvidia-smi on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node_agent.gpu import describe, own_gpu


def fake_smi(folder: Path, body: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_name_and_memory_come_from_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answers like the real one, and only for the index it is asked about.
    fake_smi(tmp_path, 'test "$3 $4" = "-i 3" && echo "NVIDIA H200, 143771" || exit 6')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    info = own_gpu(3)
    assert (info.index, info.name, info.memory_bytes) == (3, "NVIDIA H200", 143771 * 2**20)
    assert info.visible_devices == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    # Without --gpu, the environment's device (as Ray or Kubernetes set it) is described.
    info = own_gpu(-1)
    assert (info.index, info.name) == (3, "NVIDIA H200")


def test_no_gpu_or_no_nvidia_smi_leaves_the_description_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    info = own_gpu(-1)
    assert (info.index, info.name, info.memory_bytes, info.visible_devices) == (-1, "", 0, "")
    assert describe(0) == ("", 0)


def test_a_failing_nvidia_smi_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert describe(0) == ("", 0)
    fake_smi(tmp_path, "echo garbage")
    assert describe(0) == ("", 0)
