"""Shared fixtures: tool requirements and the real BuildGrid server.

A test that needs a host tool calls :func:`require_tool`. Outside CI a missing tool skips
the test; with ``CI=true`` it fails, so a CI run can never go green by skipping.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILDGRID_HARNESS = REPO / "deploy" / "buildgrid" / "start.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip (locally) or fail (in CI) unless ``condition`` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    return path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def buildgrid() -> str:
    """A real BuildGrid 0.4.4 (with its PostgreSQL) on loopback, for the whole session.

    Yields ``HOST:PORT``. The port comes from ``BGD_PORT`` (default 50051). The server is
    left running if it was already running before the session (a developer's own).
    """
    env = {**os.environ, "BGD_PORT": os.environ.get("BGD_PORT", "50051")}
    was_running = subprocess.run(
        [str(BUILDGRID_HARNESS), "status"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    ).returncode == 0
    started = subprocess.run(
        [str(BUILDGRID_HARNESS), "start"], env=env, stdout=subprocess.PIPE, text=True, timeout=900,
    )
    require(started.returncode == 0, "BuildGrid could not be started (see stderr above)")
    yield started.stdout.strip()
    if not was_running:
        subprocess.run([str(BUILDGRID_HARNESS), "stop"], env=env, check=False, timeout=120)
