import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_sample_config_is_current(tmp_path):
    """etc/volt/volt.conf.sample is what oslo-config-generator makes of volt.conf today."""
    out = tmp_path / "volt.conf.sample"
    generator = Path(sys.executable).with_name("oslo-config-generator")
    subprocess.run(
        [
            str(generator),
            "--config-file",
            str(ROOT / "etc/volt/volt-config-generator.conf"),
            "--output-file",
            str(out),
        ],
        check=True,
        cwd=ROOT,
    )
    assert out.read_text() == (ROOT / "etc/volt/volt.conf.sample").read_text(), (
        "regenerate with: tox -e genconfig"
    )
