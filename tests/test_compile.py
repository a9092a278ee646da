"""The hot path: a batch is validated once at the model's boundary, no layer reads data back
from the device, and ``model.bpd`` traces with torch._dynamo into one graph (0 graph breaks)."""

import pytest
import torch
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    MultiscaleCompositeTransform,
    OneByOneConvolution,
    SqueezeTransform,
)
from torch.overrides import TorchFunctionMode

from flowkit.layers import Dequantization, gated_conv_net
from flowkit.models import ImageFlow, glow, tutorial_flow
from flowkit.nflows_compat import unpatched

# tensor methods that copy data to the host: a device synchronisation on a GPU
HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class HostReads(TorchFunctionMode):
    """Records every tensor-to-host read made inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def hand_built_glow() -> ImageFlow:
    """A two-level Glow as a user assembles it from nflows parts and flowkit's dequantization."""
    flow = MultiscaleCompositeTransform(2)
    for shape in [(4, 4, 4), (8, 2, 2)]:
        c = shape[0]
        mask = [1 if j >= c // 2 else -1 for j in range(c)]
        steps = [ActNorm(c), OneByOneConvolution(c), AffineCouplingTransform(mask, gated_conv_net(8, 1))]
        flow.add_transform(CompositeTransform([SqueezeTransform(), *steps]), shape)
    return ImageFlow(Dequantization(num_levels=17), flow, (1, 8, 8))


MODELS = {
    "multiscale": lambda: tutorial_flow("multiscale", (1, 8, 8), num_levels=17),
    "glow": lambda: glow((1, 8, 8), num_scales=2, steps_per_scale=1, hidden_channels=8, num_levels=17),
    "hand-built glow": hand_built_glow,
}


def _initialised(name: str) -> tuple[ImageFlow, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randint(0, 17, (4, 1, 8, 8))
    model.initialize(x)
    model.train()
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_batch_is_read_once_at_the_boundary_and_never_inside(name):
    model, x = _initialised(name)
    with HostReads() as checked:
        loss = model.bpd(x).mean()
    assert checked.reads == ["tolist"], "validate=True: exactly one read, the boundary's min/max"
    with HostReads() as trusted:
        loss = model.bpd(x, validate=False).mean()
    with HostReads() as backward:
        loss.backward()
    assert trusted.reads == [] and backward.reads == []


def _conditional_glow() -> tuple[ImageFlow, torch.Tensor, torch.Tensor]:
    """A class-conditional Glow (prior + label embedding in the couplings), initialised, training mode."""
    torch.manual_seed(0)
    model = glow((1, 8, 8), num_scales=2, steps_per_scale=1, hidden_channels=8, num_levels=17, num_classes=10)
    x, y = torch.randint(0, 17, (4, 1, 8, 8)), torch.tensor([0, 3, 9, 3])
    model.initialize(x, y)
    model.train()
    return model, x, y


def test_a_conditional_batch_and_its_labels_are_read_at_the_boundary_only():
    model, x, y = _conditional_glow()
    with HostReads() as checked:
        loss = model.bpd(x, y).mean()
    assert checked.reads == ["tolist", "tolist"], "validate=True: the images' and the labels' min/max"
    with HostReads() as trusted:
        loss = model.bpd(x, y, validate=False).mean()
    with HostReads() as backward:
        loss.backward()
    assert trusted.reads == [] and backward.reads == []


@pytest.mark.slow
def test_conditional_bpd_traces_into_one_graph():
    model, x, y = _conditional_glow()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.bpd)(x, y)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_nflows_actnorm_reads_its_flag_only_when_it_changed():
    act = ActNorm(3).train()
    x = torch.randn(16, 3, 2, 2) * 5 + 2
    act(x)  # data-dependent init on the first training batch
    with HostReads() as patched:
        for _ in range(3):
            act(x)
    assert patched.reads == []
    with unpatched(), HostReads() as original:
        act(x)
    assert original.reads == ["__bool__"], "nflows' own forward reads the flag on every call"


def test_actnorm_patch_still_initialises_when_it_must():
    act = ActNorm(3).train()
    x = torch.randn(64, 3, 2, 2) * 5 + 2
    act(x)
    initialised = act.log_scale.detach().clone()
    assert not torch.allclose(initialised, torch.zeros(3))
    act.double()  # a new buffer: read once, still initialised, no re-init
    act(x.double())
    torch.testing.assert_close(act.log_scale.detach().float(), initialised)
    act.float().load_state_dict(ActNorm(3).state_dict())  # an uninitialised state: init again
    assert bool(act.initialized) is False
    act(x * 2)
    assert bool(act.initialized) is True
    torch.testing.assert_close(act.log_scale.detach(), initialised - torch.log(torch.tensor(2.0)), rtol=0, atol=1e-5)
    act.eval()
    fresh = ActNorm(3).eval()
    fresh(x)  # eval never initialises (nflows' rule)
    assert bool(fresh.initialized) is False


def test_actnorm_traces_into_one_graph_only_with_the_patch():
    act = ActNorm(3).train()
    x = torch.randn(8, 3, 2, 2)
    act(x)
    torch._dynamo.reset()
    assert torch._dynamo.explain(act)(x).graph_break_count == 0
    with unpatched():
        torch._dynamo.reset()
        assert torch._dynamo.explain(act)(x).graph_break_count >= 1
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_bpd_traces_into_one_graph(name):
    model, x = _initialised(name)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.bpd)(x)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compile_keeps_the_function_and_the_boundary_check():
    torch.manual_seed(0)
    model = glow((1, 8, 8), num_scales=1, steps_per_scale=1, hidden_channels=4, num_layers=1, num_levels=17)
    x = torch.randint(0, 17, (4, 1, 8, 8))
    model.initialize(x)
    torch.manual_seed(5)
    eager = model.bpd(x)
    model.compile(backend="eager")  # dynamo only (no code generation): seconds, not minutes
    torch.manual_seed(5)
    compiled = model.bpd(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    compiled.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match=r"x: values must lie in \[0, 17\)"):
        model.bpd(torch.full((2, 1, 8, 8), 17))
