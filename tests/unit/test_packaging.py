"""The installed layout: one import root, ``reapi_worker``, and one console script."""

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_installs_only_under_the_reapi_worker_root(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("reapi_worker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"reapi_worker", next(t for t in tops if t.endswith(".dist-info"))}
    for package in ("host", "protos", "storage", "storage/directory", "sandbox", "worker"):
        assert f"reapi_worker/{package}/__init__.py" in names
    assert "reapi_worker/__init__.py" not in names  # a namespace root: nothing of its own
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "reapi-worker = reapi_worker.worker.cli:main" in entry_points


def test_generated_protos_are_imported_only_in_protos():
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("protos", ".venv", "build") or "buildgrid-venv" in str(rel):
            continue
        text = path.read_text(errors="replace")
        if path.name != "test_packaging.py" and ("from buildgrid." in text or "import buildgrid" in text):
            offenders.append(str(rel))
    assert offenders == []
