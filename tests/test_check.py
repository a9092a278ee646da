"""check_transform cannot be fooled by batch position, and reports (never raises on) broken layers."""

import warnings

import pytest
import torch
from nflows.transforms import ActNorm, Transform

from flowkit import check_transform
from flowkit.check import CheckReport, Tolerance, format_reports, format_row


class Scale(Transform):
    """A user's layer: ``z = x * exp(s)`` per feature, ``log|det| = sum(s)``."""

    def __init__(self, features=3):
        super().__init__()
        self.s = torch.nn.Parameter(torch.linspace(-0.5, 0.5, features))

    def forward(self, inputs, context=None):
        return inputs * self.s.exp(), self.s.sum().expand(inputs.shape[0]).clone()

    def inverse(self, inputs, context=None):
        return inputs * (-self.s).exp(), (-self.s.sum()).expand(inputs.shape[0]).clone()


class WrongOnLastSample(Scale):
    def forward(self, inputs, context=None):
        z, ladj = super().forward(inputs, context)
        bump = torch.zeros_like(ladj)
        bump[-1] = 0.1
        return z, ladj + bump


class ShiftsInPlace(Scale):
    def forward(self, inputs, context=None):
        inputs += 1.0  # the caller's tensor changes
        return super().forward(inputs - 1.0, context)


class PerDimensionLogdet(Scale):
    def forward(self, inputs, context=None):
        return inputs * self.s.exp(), self.s.expand_as(inputs)  # [B, D], not summed


class Float32Logdet(Scale):
    def forward(self, inputs, context=None):
        z, ladj = super().forward(inputs, context)
        return z, ladj.float()


class InverseRaises(Scale):
    def inverse(self, inputs, context=None):
        raise RuntimeError("not implemented\nsecond line")


class ForwardRaises(Scale):
    def forward(self, inputs, context=None):
        raise ValueError("bad shape")


def _x(batch=6, features=3, dtype=torch.float64):
    return torch.randn(batch, features, dtype=dtype, generator=torch.Generator().manual_seed(0))


def test_a_correct_layer_passes_on_every_sample():
    report = check_transform(Scale().double(), _x())
    assert report.ok and report.failures == [] and report.reason == ""
    assert report.samples == 6 and report.jacobian_error < 1e-12
    assert report.tolerance == Tolerance(1e-9, 1e-9) and report.jacobian_tolerance == Tolerance(1e-9, 1e-9)


def test_a_logdet_wrong_only_on_the_last_sample_is_caught():
    report = check_transform(WrongOnLastSample().double(), _x(batch=6))
    assert not report.ok
    assert "log-det differs from log|det J| by 1.0e-01 (sample 5)" in report.reason
    # fewer samples are spread over the batch: the last one is among them
    assert not check_transform(WrongOnLastSample().double(), _x(batch=6), max_samples=2).ok


def test_an_in_place_layer_is_reported_and_the_callers_batch_is_untouched():
    x = _x()
    kept = x.clone()
    report = check_transform(ShiftsInPlace().double(), x)
    assert not report.ok and "forward modified its input in place (max change 1.0e+00)" in report.reason
    assert torch.equal(x, kept)


def test_a_per_dimension_logdet_is_a_failing_row_not_a_crash():
    report = check_transform(PerDimensionLogdet().double(), _x())
    assert not report.ok and "forward returned a log-det of shape [6, 3]; expected [6]" in report.reason
    assert report.roundtrip_error < 1e-12  # what can still be checked is checked


def test_a_dtype_change_is_reported():
    report = check_transform(Float32Logdet().double(), _x())
    assert not report.ok and "forward returned float32 log-dets for float64 inputs" in report.reason


@pytest.mark.parametrize(
    "layer, reason",
    [
        (InverseRaises(), "inverse raised RuntimeError: not implemented"),
        (ForwardRaises(), "forward raised ValueError: bad shape"),
    ],
    ids=["inverse", "forward"],
)
def test_an_exception_is_a_failing_row(layer, reason):
    report = check_transform(layer.double(), _x())
    assert not report.ok and reason in report.reason and "\n" not in report.reason
    assert reason in format_row(report)


def test_tolerances_are_arguments():
    layer = Scale().double()
    with torch.no_grad():
        layer.s.add_(1e-3)
    x = _x()
    assert check_transform(layer, x, atol=0.0, rtol=0.0).samples == 6
    with pytest.raises(ValueError, match="atol: expected a finite number >= 0"):
        check_transform(layer, x, atol=-1.0)
    with pytest.raises(TypeError, match="max_samples: expected an int"):
        check_transform(layer, x, max_samples=2.0)
    with pytest.raises(ValueError, match="inputs: expected a batch tensor"):
        check_transform(layer, torch.zeros(3))
    with pytest.raises(TypeError, match="transform: expected an nflows Transform or a normflows Flow"):
        check_transform(torch.nn.Linear(3, 3), x)


def test_the_old_keyword_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="max_samples"):
        report = check_transform(Scale().double(), _x(), max_jacobian_samples=1)
    assert report.ok and report.samples == 1


def test_the_layer_keeps_its_mode():
    layer = ActNorm(3)
    layer.train()
    check_transform(layer, _x(dtype=torch.float32))
    assert layer.training
    layer.eval()
    check_transform(layer, _x(dtype=torch.float32))
    assert not layer.training


def test_report_is_a_dataclass_and_formats_as_a_table():
    report = check_transform(Scale(), _x(dtype=torch.float32), name="my scale")
    assert isinstance(report, CheckReport) and report.dtype == "float32" and report.name == "my scale"
    table = format_reports([report])
    assert table.splitlines()[0].startswith("layer") and table.splitlines()[2].endswith("yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        str(report)
