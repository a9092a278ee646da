"""MemorySavingComposite: same values and gradients as CompositeTransform, less saved memory."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from nflows.transforms import (
    ActNorm,
    AdditiveCouplingTransform,
    AffineCouplingTransform,
    CompositeTransform,
    OneByOneConvolution,
    PiecewiseRationalQuadraticCouplingTransform,
    SqueezeTransform,
    Transform,
)
from torch import nn

import flowkit
from flowkit.check import LAYER_CASES, check_transform, perturb_parameters
from flowkit.layers import (
    Dequantization,
    GatedConvNet,
    MaskedAffineCoupling,
    MemorySavingComposite,
    checkerboard_mask,
    gated_conv_net,
)
from flowkit.layers.memory_saving import _CouplingStep, _InvertibleSequence, _plan
from flowkit.models.glow import glow_step

RTOL = 1e-10  # float64: relative to the largest entry of each gradient


def glow_steps(num_steps: int, channels: int, hidden: int = 8) -> list[Transform]:
    steps: list[Transform] = []
    for i in range(num_steps):
        mask = [1, -1] * (channels // 2) if i % 2 == 0 else [-1, 1] * (channels // 2)
        coupling = AffineCouplingTransform if i % 3 != 2 else AdditiveCouplingTransform
        steps += [ActNorm(channels), OneByOneConvolution(channels), coupling(mask, gated_conv_net(hidden, 1))]
    return steps


def glow_stack() -> list[Transform]:
    """3 Glow steps on 4x4x4, a squeeze, 2 Glow steps on 16x2x2."""
    return glow_steps(3, 4) + [SqueezeTransform()] + glow_steps(2, 16)


def checkerboard_stack(context_channels: int = 0) -> list[Transform]:
    return [
        MaskedAffineCoupling(
            checkerboard_mask(4, 4, invert=i % 2 == 1), GatedConvNet(2, 4, 8, 1, context_channels=context_channels), 2
        )
        for i in range(4)
    ]


def pair(steps: list[Transform], dtype=torch.float64, seed: int = 0):
    """(plain, saving) with identical perturbed parameters."""
    saving = MemorySavingComposite(steps).to(dtype)
    perturb_parameters(saving, scale=0.1, seed=seed)
    plain = CompositeTransform(copy.deepcopy(list(saving._transforms)))
    return plain, saving


def run(flow, x, context=None, direction="forward", loss="both"):
    """Values and gradients (inputs, context, every parameter) of a NLL-like loss."""
    flow.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if context is not None:
        context = context.clone().requires_grad_(True)
    z, ladj = getattr(flow, direction)(x, context)
    terms = {"both": 0.5 * z.square().sum() - ladj.sum(), "z": z.sin().sum(), "ladj": ladj.square().sum()}
    terms[loss].backward()
    grads = [x.grad] + ([context.grad] if context is not None else []) + [p.grad for p in flow.parameters()]
    return z.detach(), ladj.detach(), grads


def assert_close(a, b, rtol=RTOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = a.abs().max().clamp_min(1e-300)
    assert ((a - b).abs().max() / scale).item() <= rtol


def assert_same_run(ref, got, rtol=RTOL):
    assert_close(ref[0], got[0], rtol)
    assert_close(ref[1], got[1], rtol)
    assert len(ref[2]) == len(got[2])
    for i, (g_ref, g_got) in enumerate(zip(ref[2], got[2], strict=False)):
        assert g_ref is not None and g_got is not None, f"gradient {i} missing"
        assert g_ref.abs().max() > 0, f"gradient {i} is zero: the test would not see an error"
        assert_close(g_ref, g_got, rtol)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_glow_stack_gradients_match_plain_autograd(direction):
    torch.manual_seed(0)
    plain, saving = pair(glow_stack())
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    if direction == "inverse":
        plain.train(), saving.train()
        with torch.no_grad():  # initialise ActNorms (same batch, same result) so inverse takes the saving path
            plain(x)
            saving(x)
        x = torch.randn(3, 16, 2, 2, dtype=torch.float64)
    ref = run(plain, x, direction=direction)
    got = run(saving, x, direction=direction)
    assert_same_run(ref, got)


def test_saving_path_is_used_in_training():
    torch.manual_seed(0)
    _, saving = pair(glow_stack())
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    z, ladj = saving(x)
    assert z.grad_fn is not None and z.grad_fn.name().startswith(_InvertibleSequence.__name__)
    saving.eval()
    z, _ = saving(x)
    assert not z.grad_fn.name().startswith(_InvertibleSequence.__name__)
    saving.train()
    with torch.no_grad():
        z, ladj = saving(x)
    assert z.grad_fn is None and ladj.grad_fn is None


def test_checkerboard_stack_with_context():
    torch.manual_seed(1)
    plain, saving = pair(checkerboard_stack(context_channels=1))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    context = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert_same_run(run(plain, x, context), run(saving, x, context))


@pytest.mark.parametrize("loss", ["z", "ladj"])
def test_only_one_output_used(loss):
    torch.manual_seed(2)
    plain, saving = pair(checkerboard_stack())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    assert_same_run(run(plain, x, loss=loss), run(saving, x, loss=loss))


def test_actnorm_initialised_like_plain_on_first_training_call():
    torch.manual_seed(3)
    plain, saving = pair(glow_steps(3, 4))  # ActNorms still uninitialised
    x = 2.0 + 3.0 * torch.randn(4, 4, 4, 4, dtype=torch.float64)
    ref = run(plain, x)
    got = run(saving, x)
    assert_same_run(ref, got)
    for a, b in zip(plain.modules(), saving.modules(), strict=False):
        if isinstance(a, ActNorm):
            assert bool(b.initialized)
            assert_close(a.log_scale, b.log_scale, 1e-12)
            assert_close(a.shift, b.shift, 1e-12)


def test_frozen_parameters_and_data_without_grad():
    torch.manual_seed(4)
    plain, saving = pair(glow_steps(2, 4))
    for flow in (plain, saving):
        flow._transforms[1].requires_grad_(False)  # freeze the first 1x1 convolution
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    outs = []
    for flow in (plain, saving):
        flow.zero_grad(set_to_none=True)
        z, ladj = flow(x)
        (0.5 * z.square().sum() - ladj.sum()).backward()
        outs.append([p.grad for p in flow.parameters()])
    for g_ref, g_got, p in zip(outs[0], outs[1], saving.parameters(), strict=False):
        if p.requires_grad:
            assert_close(g_ref, g_got)
        else:
            assert g_ref is None and g_got is None


def test_values_match_in_eval_and_inverse_roundtrip():
    torch.manual_seed(5)
    plain, saving = pair(glow_stack())
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    plain.eval(), saving.eval()
    z_ref, l_ref = plain(x)
    z, ladj = saving(x)
    assert torch.equal(z, z_ref) and torch.equal(ladj, l_ref)
    x_back, ladj_inv = saving.inverse(z)
    assert_close(x, x_back, 1e-12)
    assert (ladj + ladj_inv).abs().max() < 1e-10


def test_state_dict_is_interchangeable_with_composite_transform():
    plain, saving = pair(glow_steps(2, 4), seed=6)
    fresh = MemorySavingComposite(glow_steps(2, 4)).double()
    fresh.load_state_dict(plain.state_dict())
    assert set(fresh.state_dict()) == set(plain.state_dict())
    for a, b in zip(fresh.state_dict().values(), plain.state_dict().values(), strict=False):
        assert torch.equal(a, b)


def test_registry_case_passes_check_transform():
    case = LAYER_CASES["MemorySavingComposite(glow steps)"]()
    perturb_parameters(case.transform)
    report = check_transform(case.transform, case.inputs, case.context)
    assert report.ok, str(report)


def test_check_transform_float64_glow_stack():
    _, saving = pair(glow_stack())
    report = flowkit.check_transform(saving, torch.randn(2, 4, 4, 4, dtype=torch.float64), max_samples=1)
    assert report.ok, str(report)


class _ForwardOnly(Transform):
    def forward(self, inputs, context=None):
        return inputs * 2.0, inputs.new_full((inputs.shape[0],), inputs[0].numel() * 0.6931471805599453)


class _DropoutNet(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.Dropout(0.1))

    def forward(self, x, context=None):
        return self.net(x)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: [ActNorm(1), Dequantization(256)], r"transforms\[1\].*Dequantization is stochastic"),
        (
            lambda: [AffineCouplingTransform([1, -1], _DropoutNet)],
            r"transforms\[0\].*inside AffineCouplingTransform.*Dropout",
        ),
        (lambda: [CompositeTransform([ActNorm(2), _ForwardOnly()])], r"transforms\[0\].*_ForwardOnly has no inverse"),
        (lambda: [nn.BatchNorm2d(2)], None),
        (lambda: [], r"at least one"),
    ],
)
def test_bad_layers_are_rejected(bad, match):
    layers = bad()
    if layers and not isinstance(layers[0], Transform):
        with pytest.raises(TypeError, match=r"transforms\[0\]: expected an nflows Transform, got BatchNorm2d"):
            MemorySavingComposite(layers)
    else:
        with pytest.raises(ValueError, match=match):
            MemorySavingComposite(layers)


def test_batch_statistics_rejected_inside_a_net():
    def net(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out))

    with pytest.raises(ValueError, match="batch statistics"):
        MemorySavingComposite([AffineCouplingTransform([1, -1], net)])


def saved_bytes(flow, x) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward + loss
    (the backward runs outside the hooks: the recompute's own saves are transient)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, ladj = flow(x)
        loss = 0.5 * z.square().sum() - ladj.sum()
    loss.backward()
    return sum(storages.values())


def test_saved_memory_does_not_grow_with_depth():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 8, 8)
    plain = {n: CompositeTransform(glow_steps(n, 4)) for n in (2, 6)}
    saving = {n: MemorySavingComposite(glow_steps(n, 4)) for n in (2, 6)}
    for flows in (plain, saving):
        for f in flows.values():
            with torch.no_grad():
                f(x)  # ActNorm init outside the measurement
    plain_bytes = {n: saved_bytes(f, x) for n, f in plain.items()}
    saving_bytes = {n: saved_bytes(f, x) for n, f in saving.items()}
    assert plain_bytes[6] > 2 * plain_bytes[2]
    # only the output is saved (the loss's own save of z shares its storage)
    activation = x.numel() * x.element_size()
    assert saving_bytes[2] == saving_bytes[6] == activation


def test_reconstruction_monitor_reports_and_warns():
    torch.manual_seed(8)
    _, saving = pair(checkerboard_stack())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    saving.max_reconstruction_error = 1e-10
    z, ladj = saving(x.requires_grad_())
    (0.5 * z.square().sum() - ladj.sum()).backward()
    assert saving.last_reconstruction_error is not None and saving.last_reconstruction_error < 1e-12
    # make the stored input disagree with what the steps rebuild: a silent change of the
    # parameters between forward and backward (the monitor's purpose is to catch such drift)
    z, ladj = saving(x)
    with torch.no_grad():
        saving._transforms[0].net.net[-1].bias.add_(0.5)
    with pytest.warns(RuntimeWarning, match="max_reconstruction_error"):
        (0.5 * z.square().sum() - ladj.sum()).backward()
    assert saving.last_reconstruction_error > 1e-3


def test_bad_max_reconstruction_error():
    with pytest.raises(ValueError, match="max_reconstruction_error"):
        MemorySavingComposite([ActNorm(2)], max_reconstruction_error=-1.0)


# ---- the fused path: couplings (one net call per backward), ActNorm / 1x1 conv runs ----------


def plan_kinds(saving: MemorySavingComposite, inverse: bool = False) -> list[str]:
    return [type(step).__name__ for step in _plan(saving._transforms, inverse)]


class _ContextNet(nn.Module):
    """A user's coupling net for [B, D] data: ``net(x, context)`` as nflows calls it."""

    def __init__(self, c_in, c_out, context_features=0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(c_in + context_features, 16), nn.Tanh(), nn.Linear(16, c_out))

    def forward(self, x, context=None):
        return self.body(x if context is None else torch.cat([x, context], dim=1))


def glow_with_clamped_coupling() -> list[Transform]:
    """flowkit's own Glow steps (nested CompositeTransforms, contiguous channel halves)."""
    return [glow_step(4, i, hidden_channels=8, num_layers=1, coupling="clamped-affine") for i in range(3)]


def mixed_order_stack() -> list[Transform]:
    """Channel runs in unusual orders and lengths, a user's Transform in between."""
    return [
        OneByOneConvolution(4),
        ActNorm(4),
        OneByOneConvolution(4),
        AffineCouplingTransform([-1, -1, 1, 1], gated_conv_net(8, 1)),
        ActNorm(4),
        _UserScale(4),
        ActNorm(4),
        AdditiveCouplingTransform([1, 1, -1, -1], gated_conv_net(8, 1)),
        OneByOneConvolution(4),
    ]


class _UserScale(Transform):
    """A user's own layer: per-channel ``y = x * exp(a)``; memory saving treats it generically."""

    def __init__(self, channels):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def forward(self, inputs, context=None):
        s = self.log_scale.view(1, -1, 1, 1)
        return inputs * s.exp(), (s.expand_as(inputs)).flatten(1).sum(1)

    def inverse(self, inputs, context=None):
        s = self.log_scale.view(1, -1, 1, 1)
        return inputs * (-s).exp(), -(s.expand_as(inputs)).flatten(1).sum(1)


def test_plan_fuses_known_layers_and_falls_back_for_others():
    assert plan_kinds(MemorySavingComposite(glow_stack())) == (
        ["_ChannelLinearStep", "_CouplingStep"] * 3 + ["_GenericStep"] + ["_ChannelLinearStep", "_CouplingStep"] * 2
    )
    assert (
        plan_kinds(MemorySavingComposite(glow_with_clamped_coupling())) == ["_ChannelLinearStep", "_CouplingStep"] * 3
    )
    kinds = plan_kinds(MemorySavingComposite(mixed_order_stack()))
    assert kinds == [
        "_ChannelLinearStep",
        "_CouplingStep",
        "_ChannelLinearStep",
        "_GenericStep",
        "_ChannelLinearStep",
        "_CouplingStep",
        "_ChannelLinearStep",
    ]
    assert plan_kinds(MemorySavingComposite(checkerboard_stack())) == ["_GenericStep"] * 4
    for stack in (glow_stack, glow_with_clamped_coupling):  # hand-written elementwise gradients
        steps = _plan(MemorySavingComposite(stack())._transforms, inverse=False)
        assert all(s._scale_and_shift is not None for s in steps if isinstance(s, _CouplingStep))


def test_hooks_and_overridden_forward_fall_back_to_the_generic_path():
    class MyCoupling(AffineCouplingTransform):
        def forward(self, inputs, context=None):
            return super().forward(inputs, context)

    hooked = ActNorm(4)
    hooked.register_forward_hook(lambda *args: None)
    saving = MemorySavingComposite([hooked, MyCoupling([1, 1, -1, -1], gated_conv_net(8, 1))])
    assert plan_kinds(saving) == ["_GenericStep", "_GenericStep"]


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("loss", ["both", "z", "ladj"])
@pytest.mark.parametrize("stack", [glow_with_clamped_coupling, mixed_order_stack, glow_stack])
def test_fused_gradients_match_plain_autograd(stack, loss, direction):
    """Input, every parameter (ActNorm, 1x1 conv, coupling nets, ClampedAffineCoupling's
    log_clamp, a user's layer) and the log-det path, float64, both directions."""
    torch.manual_seed(10)
    plain, saving = pair(stack())
    x = 1.0 + 2.0 * torch.randn(3, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():  # ActNorm init on the same batch for both
        plain(x)
        saving(x)
    if direction == "inverse":
        x = plain(x)[0].detach() if stack is not glow_stack else torch.randn(3, 16, 2, 2, dtype=torch.float64)
    ref = run(plain, x, direction=direction, loss=loss)
    got = run(saving, x, direction=direction, loss=loss)
    assert_close(ref[0], got[0])
    assert_close(ref[1], got[1])
    reached = 0
    for i, (g_ref, g_got) in enumerate(zip(ref[2], got[2], strict=True)):
        assert g_got is not None, f"gradient {i} missing"
        if g_ref is None:  # the loss cannot reach it: memory saving gives zeros (documented)
            assert not g_got.abs().max() > 0, f"gradient {i}: plain autograd has none, got {g_got}"
        else:
            assert_close(g_ref, g_got)
            reached += bool(g_ref.abs().max() > 0)
    assert reached >= len(ref[2]) // 2, "too few non-zero gradients: the test would not see an error"


class _SoftplusCoupling(AffineCouplingTransform):
    """A user's affine coupling with another scale: the elementwise map is not nflows' own, so
    the fused step differentiates a rebuilt local graph instead of the hand-written gradients."""

    def _coupling_transform_forward(self, inputs, transform_params):
        scale = nn.functional.softplus(transform_params[:, self.num_transform_features :]) + 0.5
        shift = transform_params[:, : self.num_transform_features]
        return inputs * scale + shift, scale.log().flatten(1).sum(1)

    def _coupling_transform_inverse(self, inputs, transform_params):
        scale = nn.functional.softplus(transform_params[:, self.num_transform_features :]) + 0.5
        shift = transform_params[:, : self.num_transform_features]
        return (inputs - shift) / scale, -scale.log().flatten(1).sum(1)


def spline_and_user_couplings() -> list[Transform]:
    """nflows' rational-quadratic spline coupling and a user's affine subclass, on [B, D] data."""

    def net(c_in, c_out):
        return _ContextNet(c_in, c_out)

    return [
        ActNorm(4),
        PiecewiseRationalQuadraticCouplingTransform([1, -1, 1, -1], net, num_bins=4, tails="linear", tail_bound=4.0),
        _SoftplusCoupling([-1, 1, -1, 1], net),
        ActNorm(4),
        PiecewiseRationalQuadraticCouplingTransform([-1, -1, 1, 1], net, num_bins=4, tails="linear", tail_bound=4.0),
    ]


@pytest.mark.filterwarnings("ignore:Inputs to the softmax are not scaled down")
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_fused_couplings_without_hand_written_gradients(direction):
    torch.manual_seed(13)
    plain, saving = pair(spline_and_user_couplings())
    steps = _plan(saving._transforms, inverse=False)
    kinds = [type(s).__name__ for s in steps]
    assert kinds == ["_ChannelLinearStep", "_CouplingStep", "_CouplingStep", "_ChannelLinearStep", "_CouplingStep"]
    assert all(s._scale_and_shift is None for s in steps if isinstance(s, _CouplingStep))  # the generic local graph
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        plain(x)
        saving(x)
    if direction == "inverse":
        x = plain(x)[0].detach()
    assert_same_run(run(plain, x, direction=direction), run(saving, x, direction=direction))


def test_fused_coupling_with_context_and_2d_inputs():
    """A user's MLP coupling net with context on [B, D] data, with ActNorm (2-D) around it."""
    torch.manual_seed(11)

    def net(c_in, c_out):
        return _ContextNet(c_in, c_out, context_features=2)

    steps = [
        ActNorm(4),
        AffineCouplingTransform([1, -1, 1, -1], net),
        ActNorm(4),
        AffineCouplingTransform([-1, 1, -1, 1], net),
    ]
    plain, saving = pair(steps)
    assert plan_kinds(saving) == ["_ChannelLinearStep", "_CouplingStep"] * 2
    x = torch.randn(5, 4, dtype=torch.float64)
    context = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        plain(x, context)
        saving(x, context)
    assert_same_run(run(plain, x, context), run(saving, x, context))


def test_backward_calls_each_coupling_net_once():
    """The fusion itself: one net call per coupling in backward (the generic path makes two)."""
    torch.manual_seed(12)
    _, saving = pair(glow_with_clamped_coupling())
    nets = [m for m in saving.modules() if isinstance(m, GatedConvNet)]
    calls = []
    for n in nets:
        n.register_forward_hook(lambda module, args, out: calls.append(module))
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        saving(x)
    calls.clear()
    z, ladj = saving(x)
    assert len(calls) == len(nets)  # forward: one call each
    calls.clear()
    (z.square().sum() - ladj.sum()).backward()
    assert sorted(map(id, calls)) == sorted(map(id, nets))  # backward: exactly one call each


@pytest.mark.parametrize("shape", [(2, 4), (2, 6, 3, 3)])
def test_channel_run_rejects_wrong_shape(shape):
    saving = MemorySavingComposite([ActNorm(4), OneByOneConvolution(4)]).double()
    with torch.no_grad():
        saving(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    expected = r"inputs: ActNorm/OneByOneConvolution expects a 4-D tensor with 4 channels, got shape "
    with pytest.raises(ValueError, match=expected + re.escape(str(shape))):
        saving(torch.randn(*shape, dtype=torch.float64, requires_grad=True))


def test_max_reconstruction_error_of_the_wrong_type():
    with pytest.raises(TypeError, match="max_reconstruction_error: expected a number, got str"):
        MemorySavingComposite([ActNorm(2)], max_reconstruction_error="1e-3")
