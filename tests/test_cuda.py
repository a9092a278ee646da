"""CUDA tests: run with `pytest -m cuda` on a machine with a GPU (skipped without one)."""

import pytest
import torch

from flowkit.check import LAYER_CASES, check_transform, perturb_parameters
from flowkit.models import tutorial_flow

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_contract_on_cuda(name):
    case = LAYER_CASES[name]()
    perturb_parameters(case.transform)
    t = case.transform.to("cuda")
    move = lambda v: None if v is None else v.to("cuda")  # noqa: E731
    x, ctx = move(case.inputs), move(case.context)
    t.train()
    z, ladj = t(x, ctx)
    assert z.device.type == "cuda" and ladj.device.type == "cuda"
    t.eval()
    report = check_transform(t, x, ctx, name=name)
    assert report.ok, str(report)


@pytest.mark.parametrize("kind", ["simple", "vardeq", "multiscale"])
def test_tutorial_model_on_cuda(kind):
    model = tutorial_flow(kind, image_shape=(1, 8, 8), num_levels=17).to("cuda")
    x = torch.randint(0, 17, (4, 1, 8, 8), device="cuda")
    lp = model.log_prob(x)
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    lp.mean().backward()
    s = model.sample(2, temperature=0.7)
    assert s.device.type == "cuda" and s.dtype == torch.long
