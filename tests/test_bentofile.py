"""The Bento holds what the service imports: its Python files, as ``bentofile.yaml`` includes
them, are enough to import the service, without torch and without the rest of the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_the_included_python_files_import_the_service_without_torch(tmp_path):
    spec = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    for pattern in spec["include"]:
        for file in REPO.glob(pattern):
            if file.suffix == ".py" and file.is_file():
                target = tmp_path / file.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
    code = f"""
import sys
# Only the copied files: no editable install of the repository, no repository on the path.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [{str(tmp_path)!r}] + [p for p in sys.path[1:] if "site-packages" in p or "lib/python" in p]
import service.service
for name, module in list(sys.modules.items()):
    if name.split(".")[0] in ("service", "modeconn", "models"):
        assert module.__file__ is None or module.__file__.startswith({str(tmp_path)!r}), name
assert "torch" not in sys.modules, "the service must not import torch"
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
