"""Configuration: flag > environment (OMNI_...) > TOML file (--config) > default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def effective(component: str, *args: str, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", component, *args, "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_clean_env(), **env},
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def failure(component: str, *args: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", component, *args, "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_clean_env(), **env},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OMNI_")}


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    config = tmp_path / "omni.toml"
    config.write_text(
        '[coordinator]\nstrategy = "least_loaded"\nmax-retries = 4\nhealth-check-interval = 2.5\n'
    )
    from_file = effective("coordinator", "--config", str(config))
    assert from_file["strategy"] == {"value": "least_loaded", "source": f"file {config}"}
    assert from_file["max-retries"]["value"] == 4
    assert from_file["health-check-interval"]["value"] == 2.5
    assert from_file["shutdown-grace"]["source"] == "default"

    from_env = effective("coordinator", "--config", str(config), OMNI_MAX_RETRIES="5")
    assert from_env["max-retries"] == {"value": 5, "source": "env OMNI_MAX_RETRIES"}
    assert from_env["strategy"]["value"] == "least_loaded"

    from_flag = effective(
        "coordinator", "--config", str(config), "--max-retries", "6", OMNI_MAX_RETRIES="5"
    )
    assert from_flag["max-retries"] == {"value": 6, "source": "flag"}

    # The config file itself can come from the environment too.
    assert effective("coordinator", OMNI_CONFIG=str(config))["max-retries"]["value"] == 4


def test_agent_options_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nnode-id = "gpu-7"\nsim-itl-ms = 3\nengine-arg = ["a=1", "b=x"]\n')
    got = effective(
        "node_agent", "--config", str(config), OMNI_COORDINATOR="10.0.0.1:50051", OMNI_GPU="7"
    )
    assert got["coordinator"] == {"value": "10.0.0.1:50051", "source": "env OMNI_COORDINATOR"}
    assert got["gpu"]["value"] == 7 and got["node-id"]["value"] == "gpu-7"
    assert got["sim-itl-ms"]["value"] == 3.0
    assert got["engine-arg"]["value"] == ["a=1", "b=x"]
    assert "coordinator address is required" in failure("node_agent")


def test_unknown_keys_and_bad_values_fail_naming_them(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[coordinator]\nmax-retrys = 3\n")
    assert "unknown key 'max-retrys'" in failure("coordinator", "--config", str(config))
    config.write_text("[coordinator]\nhealth-check-interval = -1\n")
    message = failure("coordinator", "--config", str(config))
    assert "health-check-interval" in message and "must be > 0" in message
    assert "OMNI_MAX_RETRIES" in failure("coordinator", OMNI_MAX_RETRIES="many")
    assert "OMNI_LOG_FORMAT" in failure("coordinator", OMNI_LOG_FORMAT="xml")
    config.write_text('[coordinator]\nstrategy = "fastest"\n')
    assert "unknown load balancing strategy 'fastest'" in failure(
        "coordinator", "--config", str(config)
    )
    config.write_text("not toml [")
    assert "--config" in failure("coordinator", "--config", str(config))


def test_omni_config_show_asks_the_server(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "omni_rpc", "config", "show", "coordinator", "--max-retries", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_clean_env(), "OMNI_STRATEGY": "power_of_two"},
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["max-retries"] == {"value": 3, "source": "flag"}
    assert shown["strategy"] == {"value": "power_of_two", "source": "env OMNI_STRATEGY"}
