"""The README's first command: deploy/local-farm.sh starts BuildGrid and workers, pushes the
sample action through them and prints its result; ``stop`` leaves nothing running."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import psutil
import pytest

from conftest import REPO, require_tool

FARM_SCRIPT = REPO / "deploy" / "local-farm.sh"


@pytest.mark.buildgrid
@pytest.mark.bwrap
def test_local_farm_runs_the_sample_action_and_stops_cleanly():
    require_tool("bwrap")
    # Not pytest's tmp_path: its parents are 0700 and the sandbox's uid must reach the
    # build roots (a worker there reports UNHEALTHY and the script says so).
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="reapi-local-farm-", dir="/tmp"))
    farm_dir = tmp_path / "farm"
    env = {
        **os.environ, "BGD_PORT": "50091", "FARM_DIR": str(farm_dir), "FARM_WORKERS": "2",
        "FARM_METRICS_PORT": "9391",
    }
    os.chmod(tmp_path, 0o755)  # the sandbox's uid must reach the build roots below
    pids: list[int] = []

    def farm(command: str, timeout: float) -> tuple[int, str, str]:
        # Files, not pipes: the servers the script leaves running would hold a pipe open.
        out, err = tmp_path / f"{command}.out", tmp_path / f"{command}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            code = subprocess.run([str(FARM_SCRIPT), command], env=env, stdout=stdout, stderr=stderr,
                                  stdin=subprocess.DEVNULL, timeout=timeout).returncode
        return code, out.read_text(), err.read_text()

    try:
        code, out, err = farm("start", 600)
        assert code == 0, err[-3000:]
        assert "shouted: HELLO FROM THE INPUT ROOT" in out
        assert "words in the inputs: 12" in out
        assert 'path: "out/report.txt"' in out  # the ActionResult is printed
        pids = [int((farm_dir / f"worker-{i}" / "pid").read_text()) for i in (1, 2)]
        assert all(psutil.pid_exists(pid) for pid in pids)
        code, out, err = farm("sample", 120)
        assert code == 0 and "shouted: HELLO FROM THE INPUT ROOT" in out, err[-2000:]
    finally:
        stopped, _, stop_err = farm("stop", 180)
    assert stopped == 0, stop_err
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    _, _, status = farm("status", 60)
    assert "BuildGrid: not running" in status
    shutil.rmtree(tmp_path, ignore_errors=True)
