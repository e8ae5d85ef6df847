import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("project", ["volt", "virtman"])
def test_sample_config_is_current(tmp_path, project):
    """etc/<project>/<project>.conf.sample is what oslo-config-generator makes of the options
    today."""
    out = tmp_path / f"{project}.conf.sample"
    generator = Path(sys.executable).with_name("oslo-config-generator")
    # the options of this checkout, not of the one the venv's editable install names (a
    # worktree sharing another checkout's venv)
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    subprocess.run(
        [
            str(generator),
            "--config-file",
            str(ROOT / f"etc/{project}/{project}-config-generator.conf"),
            "--output-file",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))},
    )
    assert out.read_text() == (ROOT / f"etc/{project}/{project}.conf.sample").read_text(), (
        "regenerate with: tox -e genconfig"
    )
