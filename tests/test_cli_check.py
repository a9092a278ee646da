import subprocess
import sys

from flowkit.cli import main


def test_flowkit_check_prints_the_table(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "|ladj-logdetJ|" in out and "Dequantization" in out and "float64" in out
    assert "checks passed" in out and " NO" not in out


def test_import_flowkit_stays_light():
    code = "import sys, flowkit; bad = [m for m in ('matplotlib', 'torchvision', 'sklearn') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
