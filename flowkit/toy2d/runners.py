"""One model, or several of one architecture trained in lockstep (random restarts), behind one interface.

A runner draws base samples (:meth:`draw`) and pushes them through the flows (:meth:`push`,
through :func:`flowkit.toy2d.flows.push_forward`, so :mod:`flowkit.bridge` sums the log-dets),
for one model (``[batch, 2]``) or for ``k`` models at once (``[k, batch, 2]``).
:func:`reselect` keeps some of a stacked runner's models with their own Adam states.
"""

from __future__ import annotations

import copy

import torch

from flowkit.toy2d.flows import base_sample, model_log_prob, push_forward

__all__ = ["Single", "Stacked", "make_runner", "reselect"]


class Single:
    """One normflows model behind the interface :class:`Stacked` also has."""

    def __init__(self, model: torch.nn.Module):
        self.models = [model]

    def parameters(self) -> list[torch.Tensor]:
        return list(self.models[0].parameters())

    def draw(self, n: int) -> torch.Tensor:
        return base_sample(self.models[0], n)

    def push(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return push_forward(self.models[0], z0)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return model_log_prob(self.models[0], x)

    def export(self, i: int = 0) -> torch.nn.Module:
        return self.models[0]

    def state_of(self, name: str, i: int, opt: torch.optim.Optimizer) -> dict:
        params = dict(self.models[0].named_parameters())
        return opt.state.get(params[name], {})


class _Calls(torch.nn.Module):
    """``forward`` runs one of ``model``'s sampling paths, for ``torch.func.functional_call``."""

    def __init__(self, model: torch.nn.Module, what: str):
        super().__init__()
        self.m, self.what = model, what

    def forward(self, arg):
        if self.what == "draw":
            return base_sample(self.m, arg)
        return push_forward(self.m, arg) if self.what == "push" else model_log_prob(self.m, arg)


class Stacked:
    """``len(models)`` models of one architecture trained in lockstep (random restarts).

    Their parameters are stacked along a new leading dimension and the model runs once per step
    under ``torch.func.vmap``, so the Python overhead of the (small) flow is paid once, not once
    per restart (8 stacked 16-layer Planar models cost about 2x one model per step on a CPU core;
    ``benchmarks/bench_fit2d.py``). Models that ``vmap`` cannot run (data-dependent indexing,
    e.g. spline bins) run one after the other instead (``vectorized`` is False). Each restart
    keeps its own Adam state (Adam is element-wise), so the restarts do not interact.
    """

    def __init__(self, models: list[torch.nn.Module]):
        from torch.func import functional_call, stack_module_state, vmap

        self.models = models
        params, buffers = stack_module_state(models)
        self.params = {f"m.{k}": v for k, v in params.items()}
        self.buffers = {f"m.{k}": v for k, v in buffers.items()}
        template = copy.deepcopy(models[0]).to("meta")
        draw, push, log_prob = _Calls(template, "draw"), _Calls(template, "push"), _Calls(template, "log_prob")
        self._draw = lambda n: vmap(lambda p, b: functional_call(draw, (p, b), (n,)), randomness="different")(
            self.params, self.buffers
        )
        self._push = vmap(lambda p, b, z: functional_call(push, (p, b), (z,)))
        self._log_prob = vmap(lambda p, b, x: functional_call(log_prob, (p, b), (x,)))
        self.vectorized = True
        try:
            with torch.no_grad():
                self.push(self.draw(2))
        except Exception:  # noqa: BLE001 - anything vmap rejects: fall back to a plain loop
            self.vectorized = False
            self.params = {f"{i}.{k}": v for i, m in enumerate(models) for k, v in m.named_parameters()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def draw(self, n: int) -> torch.Tensor:
        if not self.vectorized:
            return torch.stack([base_sample(m, n) for m in self.models])
        return self._draw(n)

    def push(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.vectorized:
            xs, log_qs = zip(*(push_forward(m, z) for m, z in zip(self.models, z0, strict=True)), strict=True)
            return torch.stack(xs), torch.stack(log_qs)
        return self._push(self.params, self.buffers, z0)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q_i(x_i)`` for points ``[models, n, 2]`` (the models must invert)."""
        if not self.vectorized:
            return torch.stack([model_log_prob(m, xi) for m, xi in zip(self.models, x, strict=True)])
        return self._log_prob(self.params, self.buffers, x)

    def state_of(self, name: str, i: int, opt: torch.optim.Optimizer) -> dict:
        """Restart ``i``'s optimizer state for its parameter ``name``."""
        if not self.vectorized:
            return opt.state.get(self.params[f"{i}.{name}"], {})
        state = opt.state.get(self.params[f"m.{name}"], {})
        return {k: (v[i].clone() if v.dim() > 0 else v.clone()) for k, v in state.items()}

    @torch.no_grad()
    def export(self, i: int) -> torch.nn.Module:
        """Restart ``i`` as its own model (its module, with the current parameters copied in)."""
        model = self.models[i]
        if self.vectorized:
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                t.copy_((self.params[f"m.{name}"] if f"m.{name}" in self.params else self.buffers[f"m.{name}"])[i])
        return model


def make_runner(models: list[torch.nn.Module]) -> Single | Stacked:
    """A :class:`Single` for one model, a :class:`Stacked` for several."""
    return Single(models[0]) if len(models) == 1 else Stacked(models)


def reselect(
    runner: Single | Stacked, opt: torch.optim.Adam, kept: list[int]
) -> tuple[Single | Stacked, torch.optim.Adam]:
    """A runner of the models ``kept`` (slots of ``runner``), each going on with its own Adam state."""
    models = [runner.export(i) for i in kept]
    group = opt.param_groups[0]
    new_runner = make_runner(models)
    new = torch.optim.Adam(new_runner.parameters(), lr=group["lr"], weight_decay=group["weight_decay"])
    for name, _ in models[0].named_parameters():
        states = [runner.state_of(name, i, opt) for i in kept]
        if isinstance(new_runner, Single):
            new.state[dict(models[0].named_parameters())[name]] = states[0]
        elif new_runner.vectorized:
            new.state[new_runner.params[f"m.{name}"]] = {
                k: (torch.stack([st[k] for st in states]) if states[0][k].dim() > 0 else states[0][k])
                for k in states[0]
            }
        else:
            for j, st in enumerate(states):
                new.state[new_runner.params[f"{j}.{name}"]] = st
    return new_runner, new
