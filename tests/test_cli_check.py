import subprocess
import sys

import torch
from nflows.transforms import ActNorm

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


def test_flowkit_check_prints_each_row_as_it_goes(capsys, monkeypatch):
    from flowkit import check
    from flowkit.commands import check as command

    seen_when_second_case_built = []

    def first():
        return check.LayerCase(ActNorm(2), torch.randn(3, 2))

    def second():  # by the time the second case is built, the first row is on the screen
        seen_when_second_case_built.append(capsys.readouterr().out)
        raise RuntimeError("a broken case")

    monkeypatch.setattr(command, "LAYER_CASES", {"first layer": first, "second layer": second})
    assert main(["check"]) == 1  # the exit code still says whether all passed
    earlier = seen_when_second_case_built[0]
    assert "|ladj-logdetJ|" in earlier and "first layer" in earlier and "yes" in earlier
    rest = capsys.readouterr().out
    assert "second layer" in rest and "NO  building the case raised RuntimeError: a broken case" in rest
    assert "2/4 checks passed; failed: second layer (float32), second layer (float64)" in rest
