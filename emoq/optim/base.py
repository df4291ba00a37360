"""EmoOptimizer: the bookkeeping shared by the four Emo families.

It owns loss intake, emoPulse, the NaN/inf guard, the distributed loss mean, the parameter
loop, state allocation through the storage policy (``emoq.states``) and ``state_dict``.
A family adds only which states it keeps (``_state_specs``) and its rule (``_rule``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from emoq import compensate
from emoq.distributed import reduce_loss
from emoq.fused import FUSED_FAMILIES, FusedKernels, step_scalars
from emoq.pulse import EmoPulse
from emoq.states import DEFAULT_MIN_LOWBIT_SIZE, StateStorage, is_lowbit

NO_LOSS_MESSAGE = (
    "{name}.step() got no loss: emoPulse computes the step size from the loss, and emoq never "
    "substitutes one. Give it in one of three ways: opt.step(closure) with a closure that "
    "returns the loss, opt.step(loss=loss), or opt.record_loss(loss) once per micro-batch "
    "before opt.step(). In the Hugging Face Trainer add emoq.integrations.transformers.EmoCallback()."
)


@dataclass(frozen=True)
class StateSpec:
    """One optimizer state of a parameter: its shape, and whether it can be negative."""

    shape: tuple[int, ...]
    signed: bool

    def __init__(self, shape: Iterable[int], signed: bool) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "signed", bool(signed))


def is_factored(p: Tensor) -> bool:
    """SPEC.md: ``p.dim() >= 2`` and ``(shape[0] + shape[1]) / numel < 0.05``."""
    return p.dim() >= 2 and (p.shape[0] + p.shape[1]) / p.numel() < 0.05


def as_loss_float(loss: Any, what: str) -> float:
    """A loss given as a float or a one-element tensor, as a Python float."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{what} must be a scalar (float or 0-dim tensor), got a tensor of shape "
                             f"{tuple(loss.shape)}")
        return float(loss.detach().float().item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"{what} must be a float or a 0-dim tensor, got {type(loss).__name__}")


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one device sync.

    ``aminmax`` propagates NaN, shows +inf in the max and -inf in the min, and reads each
    tensor once without allocating (20x faster on CPU than ``isfinite(t).all()``, which builds
    full-size masks).
    """
    ends = [torch.stack(torch.aminmax(t.detach())).float() for t in tensors if t.numel() > 0]
    return not ends or bool(torch.isfinite(torch.cat(ends)).all())


class EmoOptimizer(Optimizer):
    """Base of EmoSens, EmoAiry, EmoCats and EmoTion (not used directly).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: the scope of emoPulse (default 1.0), *not* a learning rate. One per optimizer:
            param groups may not set their own ``lr``. After every step each group's ``lr``
            holds the real step size, so schedulers and loggers see it.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to denominators, >= 0.
        weight_decay: decoupled weight decay, >= 0 (multiplied by the step size).
        use_shadow: keep a shadow copy of each parameter (SPEC.md, "Optional shadow"). The
            shadow is stored in the parameter's dtype.
        state_precision: how states are stored: ``"fp32"``, ``"bf16"``, ``"8bit"``, ``"4bit"``
            or ``"fp8"`` (torchao blockwise states; see docs/precision.md).
        min_lowbit_size: with a low-bit ``state_precision``, the states of a parameter with
            fewer elements than this stay fp32 (default 4096; bitsandbytes' ``min_8bit_size``).
            Sizes that are not a multiple of the block (256; 128 at 4 bits) stay fp32 too.
        compensation: how an updated bf16/fp16 parameter is rounded back: ``"none"`` (to
            nearest), ``"stochastic"`` (unbiased, no memory), ``"error_feedback"`` (residual
            kept in the param dtype, 2 B/param for bf16; the default, chosen by measurement,
            docs/precision.md) or ``"error_feedback8"`` (residual in int8 ulp units, 1 B/param).
            No effect on fp32 parameters.
        fused: run EmoSens/EmoCats as one compiled dequantize -> rule -> requantize function
            per parameter. ``None`` (default): fused for low-bit states, eager reference-exact
            rule otherwise. ``True``: fused everywhere (fp32 too; fast, not bit-identical to
            the reference). ``False``: never. ``EMOQ_COMPILE=0`` runs fused kernels uncompiled.
    """

    stop_thresholds: tuple[float, float] = (1e-6, 1e-7)
    noise_floor: float = 1e-10

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.995),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        use_shadow: bool = False,
        state_precision: str = "fp32",
        min_lowbit_size: int = DEFAULT_MIN_LOWBIT_SIZE,
        compensation: str | None = None,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr (the pulse scope) must be a finite float > 0, got {lr!r}")
        self._check_hparams(betas, eps, weight_decay)
        self._storage = StateStorage(state_precision, min_lowbit_size)
        self.min_lowbit_size = min_lowbit_size
        self.compensation = compensate.check_compensation(compensation)
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        self._kernels: FusedKernels | None = None
        # the fused kernel replaces the family's rule: only where that rule is not overridden
        family = next((c for c in type(self).__mro__ if c.__name__ in FUSED_FAMILIES
                       and c.__module__.startswith("emoq.optim.")), None)
        self._family = family.__name__ if family is not None and type(self)._rule is family._rule else None
        defaults = dict(lr=float(lr), betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.use_shadow = bool(use_shadow)
        self.state_precision = state_precision
        self._pulse = EmoPulse(scope=float(lr), noise_floor=self.noise_floor,
                               stop_thresholds=self.stop_thresholds)
        self._recorded: list[Tensor | float] = []
        self.skipped_steps = 0
        self._warned_skip = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_hparams(betas: Any, eps: Any, weight_decay: Any) -> None:
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "lr" in param_group and param_group["lr"] != self.defaults["lr"]:
            raise ValueError(
                f"param groups of {type(self).__name__} cannot set their own lr ({param_group['lr']!r}): "
                "lr is the scope of the one emoPulse shared by all groups; set it on the optimizer"
            )
        self._check_hparams(param_group.get("betas", self.defaults["betas"]),
                            param_group.get("eps", self.defaults["eps"]),
                            param_group.get("weight_decay", self.defaults["weight_decay"]))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        if self._pulse.eta is not None:
            group["lr"] = self._pulse.eta
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex parameters")

    # ------------------------------------------------------------------ public state
    @property
    def pulse(self) -> float | None:
        """The step size used by the last step (``None`` before the first step)."""
        return self._pulse.eta

    @property
    def should_stop(self) -> bool:
        """The stop signal of the last step (advice; the optimizer never stops by itself)."""
        return self._pulse.should_stop

    @property
    def emo_pulse(self) -> EmoPulse:
        """The underlying :class:`~emoq.EmoPulse` (read it; do not feed it by hand)."""
        return self._pulse

    @property
    def last_loss(self) -> float | None:
        """The loss the pulse consumed at the last step (mean over ranks and micro-batches)."""
        return self._last_loss

    _last_loss: float | None = None

    # ------------------------------------------------------------------ loss intake
    def record_loss(self, loss: float | Tensor) -> None:
        """Record the loss of one micro-batch; the next ``step()`` uses the mean of all recorded."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"record_loss expects a scalar loss, got shape {tuple(loss.shape)}")
            self._recorded.append(loss.detach().reshape(()).float())
        else:
            self._recorded.append(as_loss_float(loss, "record_loss(loss)"))

    def discard_recorded_losses(self) -> None:
        """Forget the micro-batch losses recorded since the last step (e.g. when a GradScaler
        skipped ``step()``, so they do not leak into the next update's mean)."""
        self._recorded.clear()

    def _take_loss(self, closure: Callable[[], Any] | None, loss: Any) -> tuple[Any, float]:
        name = type(self).__name__
        sources = [closure is not None, loss is not None, bool(self._recorded)]
        if sum(sources) > 1:
            self._recorded.clear()
            raise RuntimeError(f"{name}.step() got a loss from more than one source (closure, loss=, "
                               "record_loss); give exactly one")
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if result is None:
                raise RuntimeError(NO_LOSS_MESSAGE.format(name=name) + " (the closure returned None)")
            return result, as_loss_float(result, "the closure's return value")
        if loss is not None:
            return loss, as_loss_float(loss, "step(loss=...)")
        if self._recorded:
            recorded, self._recorded = self._recorded, []
            return None, as_loss_float(sum(recorded), "recorded loss") / len(recorded)
        raise RuntimeError(NO_LOSS_MESSAGE.format(name=name))

    # ------------------------------------------------------------------ step
    def _params_with_grad(self) -> list[tuple[dict, Tensor]]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if torch.is_complex(p.grad):
                    raise RuntimeError(f"{type(self).__name__} does not support complex gradients")
                out.append((group, p))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | Tensor | None = None) -> Any:
        """One update. The loss comes from ``closure``, ``loss=`` or the recorded micro-batch losses.

        A non-finite loss or gradient skips the whole step (parameters, states and pulse
        untouched), warns once and increments ``skipped_steps``.
        """
        result, loss_value = self._take_loss(closure, loss)
        work = self._params_with_grad()
        grads_finite = _all_finite([p.grad for _, p in work])
        device = work[0][1].device if work else None
        loss_value, finite = reduce_loss(loss_value, grads_finite, device)
        if not finite:
            self.skipped_steps += 1
            if not self._warned_skip:
                self._warned_skip = True
                warnings.warn(f"{type(self).__name__}: non-finite loss or gradient, step skipped (parameters, "
                              "states and pulse unchanged; see .skipped_steps; warned once)",
                              RuntimeWarning, stacklevel=2)
            return result
        self._last_loss = loss_value
        lr = self._pulse.update(loss_value)
        self._scalars = {}  # fused kernels' step scalars, one tensor per (group, device) this step
        for group, p in work:
            self._update_param(p, group, lr)
        for group in self.param_groups:
            group["lr"] = lr
        return result

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        for name, spec in self._state_specs(p).items():
            state[name] = self._storage.zeros(spec.shape, signed=spec.signed, device=p.device)
        if self.use_shadow:
            state["shadow"] = p.detach().clone()

    _NOT_RULE_STATES = ("shadow", "residual")

    def _use_fused(self, p: Tensor, states: list[Tensor]) -> bool:
        if self._family is None or self.fused is False or not p.is_contiguous():
            return False
        return bool(self.fused) or any(is_lowbit(s) for s in states)

    def _update_param(self, p: Tensor, group: dict, lr: float) -> None:
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        names = [n for n in state if n not in self._NOT_RULE_STATES]
        p_work = compensate.working_copy(p, state, self.compensation)
        g = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
        if self.use_shadow:
            self._shadow_step(p_work, state["shadow"])
        states = [state[n] for n in self._state_specs(p) if n in state]  # the family's order: m, v
        if self._use_fused(p_work, states):
            if self._kernels is None:
                self._kernels = FusedKernels()
            key = (id(group), p.device)
            if key not in self._scalars:
                self._scalars[key] = step_scalars(lr, group, p.device)
            self._kernels.run(self._family, p_work.view(-1), g.reshape(-1), states, self._scalars[key],
                              self._storage)
        else:
            work = {n: self._storage.load(state[n]) for n in names}
            self._rule(p_work, g, work, group, lr)
            for n in names:
                self._storage.store(state[n], work[n])
        compensate.write_back(p, p_work, state, self.compensation)

    def _shadow_step(self, p: Tensor, shadow: Tensor) -> None:
        """SPEC.md "Optional shadow", applied before the moment update."""
        scalar, trust = self._pulse.scalar, abs(self._pulse.trust)
        ratio = 1.0 - abs(scalar) if abs(scalar) > 0.625 else 0.0
        if ratio > 0:
            p.mul_(1.0 - ratio).add_(shadow.to(p.dtype), alpha=trust)
        else:
            shadow.add_((p.to(shadow.dtype) - shadow).mul_(0.1 * trust))

    # ------------------------------------------------------------------ family hooks
    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        raise NotImplementedError

    def _rule(self, p: Tensor, g: Tensor, states: dict[str, Tensor], group: dict, lr: float) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state dict plus ``"emo"``: the pulse, skip counter and precision.

        States are plain tensors (``torch.load(weights_only=True)`` works).
        """
        sd = super().state_dict()
        sd["state"] = {
            pid: {name: (value if name in self._NOT_RULE_STATES or not isinstance(value, Tensor)
                         else self._storage.export(value))
                  for name, value in st.items()}
            for pid, st in sd["state"].items()
        }
        sd["emo"] = {
            "format": 1,
            "pulse": self._pulse.state_dict(),
            "skipped_steps": self.skipped_steps,
            "state_precision": self.state_precision,
            "compensation": self.compensation,
            "recorded": [float(x) for x in self._recorded],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, saved at any ``state_precision``."""
        state_dict = dict(state_dict)
        emo = state_dict.pop("emo", None)
        if emo is None:
            raise KeyError(f"not an emoq state_dict (no 'emo' entry): {type(self).__name__} needs the pulse "
                           "state to resume; load a state_dict saved by an emoq optimizer")
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating states to the parameter's dtype; rebuild them through the storage
        # policy from the saved values instead, so no precision is lost and precisions can differ.
        id_map = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for pid, saved in saved_state.items():
            p = id_map[pid]
            specs = self._state_specs(p)
            rebuilt: dict[str, Any] = {}
            for name, value in saved.items():
                if name == "shadow":
                    rebuilt[name] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
                elif name == "residual":  # compensation buffer: param dtype, or int8 ulp units
                    if compensate.needs_compensation(p) and self.compensation == emo.get("compensation"):
                        rebuilt[name] = value.detach().to(device=p.device, copy=True)
                elif name in specs:
                    rebuilt[name] = self._storage.import_(value, signed=specs[name].signed, device=p.device)
                else:
                    raise KeyError(f"unexpected state {name!r} for a parameter of shape {tuple(p.shape)}")
            self.state[p] = rebuilt
        self._pulse.load_state_dict(emo["pulse"])
        self.skipped_steps = int(emo.get("skipped_steps", 0))
        self._recorded = [float(x) for x in emo.get("recorded", [])]
