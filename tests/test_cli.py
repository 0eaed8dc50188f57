"""The ``llmkit`` command line, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmkit.providers.catalog import CATALOG


def llmkit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = "import sys; from llmkit.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_providers_lists_the_catalog_and_never_a_key() -> None:
    result = llmkit("providers", env={"GROQ_API_KEY": "gsk-very-secret-value"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    names = {line.split()[0] for line in lines[1:] if line.strip() and " " in line}
    assert {entry.name for entry in CATALOG} <= names
    groq = next(line for line in lines if line.startswith("groq "))
    assert "GROQ_API_KEY (set)" in groq and groq.split()[5] == "yes"
    assert "gsk-very-secret-value" not in result.stdout + result.stderr


def test_config_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[[models]]\nname = "a"\n[[models.deployments]]\nprovider = "demo"\nmodel = "x"\n'
    )
    ok = llmkit("config", "check", str(good))
    assert ok.returncode == 0 and "1 models, 1 deployments" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n")
    failed = llmkit("config", "check", str(bad))
    assert failed.returncode == 2 and "server.port" in failed.stderr
    assert llmkit("providers", "--config", str(bad)).returncode == 2


def test_usage_errors_exit_2() -> None:
    assert llmkit().returncode == 2
    assert llmkit("nonsense").returncode == 2
