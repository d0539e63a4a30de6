"""Per-sample clipping by book-keeping: per-example gradient norms and the clipped sum from one
ordinary forward and one backward pass, without materialising a gradient per example.

For a layer applied token-wise, ``y = a W^T + b`` with example i's inputs ``a_i`` (T x d_in) and
loss gradient at its outputs ``g_i`` (T x d_out), example i's weight gradient is ``g_i^T a_i``.
Its squared norm is either computed from that product (cost T d_in d_out per example) or as the
"ghost norm" ``<a_i a_i^T, g_i g_i^T>`` (cost T^2 (d_in + d_out)), whichever is cheaper; and any
row-weighted sum ``sum_i w_i g_i^T a_i = (w * g)^T a`` is one matrix product, the same one an
ordinary backward pass would compute. This is the book-keeping technique of Bu et al. (2023,
"Differentially private optimization on large model at small cost"), with Li et al.'s ghost norm
(2022) chosen per layer.

What one example's gradient is made of, per covered parameter:

- ``nn.Linear`` (any leading shape, tokens flattened per example), ``nn.Conv2d`` whose kernel
  equals its stride (a patch embedding: a linear map of non-overlapping patches);
- ``nn.LayerNorm`` (weight: ``sum_t g * x_hat``; bias: ``sum_t g``);
- ``nn.Embedding`` looked up once per example (one index per row);
- *broadcast parameters*: a parameter with leading size 1 that the model adds or concatenates to
  every example (a ViT's CLS token and position embedding). It is given to the forward pass as an
  (R, ...) copy, one row per example, whose gradient is the per-example gradient itself.

Examples must not interact in the forward pass (no batch norm): every row's gradient then comes
from its own loss only. An example may span ``group`` consecutive rows (several augmented views of
one patch, whose gradients sum to the example's): its norm is then taken of the rows' summed
gradient, which for a linear-like layer is the ghost norm over the group's tokens together.

Every covered parameter must be one of the above; :class:`Bookkeeping` refuses anything else at
construction, naming the parameter.

Norms and sums can also be taken per *part*: the covered parameters whose names start with a given
top-level module name (``discriminator``, ``classifier``), for clipping each part of an example's
gradient to its own bound (group-wise clipping, McMahan et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

SUPPORTED = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Embedding)

#: On the CPU a LayerNorm's per-example weight gradient is read from its output divided by its
#: weight when every |weight| is at least this; otherwise from its normalised input, computed again.
MIN_LAYER_NORM_SCALE = 0.05


@dataclass
class _Call:
    """One supported module's forward during a recorded pass."""

    inputs: torch.Tensor  # detached input
    output: torch.Tensor  # the output, in the graph
    grad: torch.Tensor | None = None  # d loss / d output, after backward
    derived: dict[str, Any] = field(default_factory=dict)  # (a, g) token views, LayerNorm's x_hat: computed once


@dataclass
class RecordedPass:
    """Everything one recorded forward pass left for the norms and sums."""

    rows: int
    calls: dict[str, _Call] = field(default_factory=dict)
    broadcast: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (R, ...) copy in the graph
    broadcast_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The small per-row gradients side by side, (R, K), and each one's (name, parameter shape) in order.
    packed: tuple[torch.Tensor, list[tuple[str, torch.Size]]] | None = None


def grouped_rows(rows: torch.Tensor, group: int) -> torch.Tensor:
    """Per-row tensors (R, ...) summed over consecutive groups of ``group`` rows: (R / group, ...)."""
    return rows if group == 1 else rows.reshape(-1, group, *rows.shape[1:]).sum(1)


def _group_tokens(x: torch.Tensor, group: int) -> torch.Tensor:
    """(R, T, d) token views as (R / group, group * T, d): one example's rows as one token sequence."""
    return x if group == 1 else x.reshape(-1, group * x.shape[1], x.shape[2])


def part_of(name: str) -> str:
    """A covered parameter's part: the top-level module it belongs to (``discriminator.trunk.x`` -> ``discriminator``)."""
    return name.split(".", 1)[0]


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    if (conv.kernel_size != conv.stride or conv.padding not in ((0, 0), 0) or conv.dilation != (1, 1)
            or conv.groups != 1 or conv.padding_mode != "zeros"):
        raise ValueError(f"book-keeping clipping supports Conv2d only as a patch embedding (kernel == stride, "
                         f"no padding, dilation 1, groups 1); {name!r} is {conv}")


class Bookkeeping:
    """Per-example gradient norms and row-weighted gradient sums of ``module``'s parameters ``names``.

    ``broadcast``: names of the parameters the forward pass broadcasts over the batch (leading
    size 1). Raises ``ValueError`` naming any covered parameter it cannot handle.
    """

    def __init__(self, module: nn.Module, names: list[str], broadcast: tuple[str, ...] = ()) -> None:
        self.module = module
        self.names = list(names)
        self._params = params = dict(module.named_parameters())  # updated in place by the optimisers
        self.broadcast = [n for n in self.names if n in broadcast]
        for name in self.broadcast:
            if params[name].shape[0] != 1:
                raise ValueError(f"broadcast parameter {name!r} must have leading size 1, has shape "
                                 f"{tuple(params[name].shape)}")
        #: module name -> its covered parameters ({"weight": full name, "bias": full name})
        self.layers: dict[str, dict[str, str]] = {}
        owned: set[str] = set(self.broadcast)
        for module_name, sub in module.named_modules():
            own = {local: f"{module_name}.{local}" if module_name else local
                   for local, _ in sub.named_parameters(recurse=False)}
            own = {local: full for local, full in own.items() if full in self.names and full not in owned}
            if not own:
                continue
            if not isinstance(sub, SUPPORTED):
                continue  # reported below as unsupported parameters
            if isinstance(sub, nn.Conv2d):
                _check_conv(module_name, sub)
            self.layers[module_name] = own
            owned.update(own.values())
        missing = [n for n in self.names if n not in owned]
        if missing:
            raise ValueError("book-keeping clipping cannot compute per-example gradients of "
                             f"{', '.join(missing)} (not in a Linear, LayerNorm, patch Conv2d or Embedding "
                             "layer, nor a declared broadcast parameter); use privacy.clipping=vmap")
        self._modules = dict(module.named_modules())

    # ------------------------------------------------------------------ recording
    @contextmanager
    def record(self, rows: int) -> Iterator[tuple[RecordedPass, Callable[..., Any]]]:
        """Record one forward pass over ``rows`` examples: yields (the pass, a forward function
        that calls the module with the broadcast parameters given per row)."""
        record = RecordedPass(rows)
        for name in self.broadcast:
            p = self._params[name].detach()
            record.broadcast[name] = p.expand(rows, *p.shape[1:]).clone().requires_grad_(True)
        handles = []
        for module_name in self.layers:
            def hook(sub: nn.Module, args: tuple[Any, ...], output: torch.Tensor, _name: str = module_name) -> None:
                if _name in record.calls:
                    raise RuntimeError(f"book-keeping clipping: {_name!r} ran twice in one pass (supported: once)")
                record.calls[_name] = _Call(args[0].detach(), output)
            handles.append(self._modules[module_name].register_forward_hook(hook))

        def forward(*args: Any) -> Any:
            if record.broadcast:
                return functional_call(self.module, record.broadcast, args, strict=False)
            return self.module(*args)

        try:
            yield record, forward
        finally:
            for handle in handles:
                handle.remove()

    def backward(self, record: RecordedPass, loss: torch.Tensor) -> None:
        """The loss gradient at every recorded output (no parameter gradient is computed)."""
        names = list(record.calls)
        targets = [record.calls[n].output for n in names] + list(record.broadcast.values())
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        for name, g in zip(names, grads[:len(names)]):
            record.calls[name].grad = torch.zeros_like(record.calls[name].output) if g is None else g.detach()
        for name, g in zip(record.broadcast, grads[len(names):]):
            record.broadcast_grads[name] = torch.zeros_like(record.broadcast[name]) if g is None else g.detach()

    # ------------------------------------------------------------------ per-layer algebra
    def _tokens(self, module_name: str, call: _Call) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, g) as (R, T, d_in) and (R, T, d_out) for a linear-like layer."""
        if "tokens" not in call.derived:
            sub, grad = self._modules[module_name], call.grad
            assert grad is not None
            if isinstance(sub, nn.Conv2d):
                a = F.unfold(call.inputs, sub.kernel_size, stride=sub.stride).transpose(1, 2)
                call.derived["tokens"] = a, grad.flatten(2).transpose(1, 2)
            else:
                rows = grad.shape[0]
                call.derived["tokens"] = (call.inputs.reshape(rows, -1, call.inputs.shape[-1]),
                                          grad.reshape(rows, -1, grad.shape[-1]))
        return call.derived["tokens"]

    @staticmethod
    def _normalised(sub: nn.LayerNorm, call: _Call) -> torch.Tensor:
        """LayerNorm's normalised input x_hat, (R, T, d)."""
        if "x_hat" not in call.derived:
            x_hat = F.layer_norm(call.inputs, sub.normalized_shape, eps=sub.eps)
            call.derived["x_hat"] = x_hat.reshape(x_hat.shape[0], -1, x_hat.shape[-1])
        return call.derived["x_hat"]

    def _layer_norm_weight_rows(self, sub: nn.LayerNorm, call: _Call, g: torch.Tensor,
                                bias_rows: torch.Tensor) -> torch.Tensor:
        """Every row's LayerNorm weight gradient ``sum_t g * x_hat``, (R, d).

        On the CPU: the output is ``y = x_hat * w + b``, so ``sum_t g * x_hat = (sum_t g * y - b *
        sum_t g) / w``, one product with the recorded output instead of normalising the input again
        (LayerNorm is slow there). Where a weight is near 0 the division would lose precision, and on
        a GPU, where normalising again is one fused kernel, reading the weights would make the host
        wait: ``x_hat`` is recomputed in both cases."""
        weight = sub.weight.detach()
        if weight.device.type != "cpu" or bool((weight.abs() < MIN_LAYER_NORM_SCALE).any()):
            return (g * self._normalised(sub, call)).sum(1)
        y = call.output.detach()
        y = y.reshape(y.shape[0], -1, y.shape[-1])
        summed = (g * y).sum(1)
        if sub.bias is not None:
            summed = summed - sub.bias.detach() * bias_rows
        return summed / weight

    def _ghost(self, module_name: str, call: _Call) -> bool:
        """Whether this linear-like layer's weight norm is cheaper as a ghost norm than materialised."""
        a, g = self._tokens(module_name, call)
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        return t * t * (d_in + d_out) < t * d_in * d_out

    def _per_row(self, module_name: str, call: _Call) -> dict[str, torch.Tensor]:
        """Every row's gradient of this layer's parameters, (R, *shape), where holding it is cheap: all
        but the weight of a linear-like layer whose ghost norm is cheaper. An Embedding's entry is the
        gradient of the one row each example looked up, (R, d)."""
        if "rows" not in call.derived:
            sub, own, grad = self._modules[module_name], self.layers[module_name], call.grad
            assert grad is not None
            rows: dict[str, torch.Tensor] = {}
            if isinstance(sub, nn.Embedding):
                rows["weight"] = grad.reshape(grad.shape[0], -1)
            elif isinstance(sub, nn.LayerNorm):
                g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
                bias_rows = g.sum(1)
                if "weight" in own:
                    rows["weight"] = self._layer_norm_weight_rows(sub, call, g, bias_rows)
                if "bias" in own:
                    rows["bias"] = bias_rows
            else:
                a, g = self._tokens(module_name, call)
                if "weight" in own and not self._ghost(module_name, call):
                    rows["weight"] = torch.bmm(g.transpose(1, 2), a)
                if "bias" in own:
                    rows["bias"] = g.sum(1)
            call.derived["rows"] = rows
        return call.derived["rows"]

    @staticmethod
    def _packable(sub: nn.Module, local: str) -> bool:
        """Whether a held per-row gradient goes into :meth:`_packed`: all but a linear-like layer's
        weight (large: one product of its own) and an Embedding's looked-up rows (summed by index)."""
        return not isinstance(sub, nn.Embedding) and not (local == "weight" and isinstance(sub, (nn.Linear, nn.Conv2d)))

    def _packed(self, record: RecordedPass) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
        """The small per-row gradients (LayerNorm parameters, biases, broadcast parameters) as one
        (R, K) matrix, so that their norms and their weighted sum are one operation each, not one
        per parameter."""
        if record.packed is None:
            pieces, layout = [], []
            for module_name, call in record.calls.items():
                sub, own = self._modules[module_name], self.layers[module_name]
                for local, per_row in self._per_row(module_name, call).items():
                    if self._packable(sub, local):
                        pieces.append(per_row.reshape(record.rows, -1))
                        layout.append((own[local], self._params[own[local]].shape))
            for name, grad in record.broadcast_grads.items():
                pieces.append(grad.reshape(record.rows, -1))
                layout.append((name, self._params[name].shape))
            matrix = torch.cat(pieces, dim=1) if pieces else torch.zeros(record.rows, 0, device=self.device())
            record.packed = matrix, layout
        return record.packed

    def _layer_norms(self, module_name: str, call: _Call, rows: slice, packed: bool = False,
                     group: int = 1) -> torch.Tensor:
        """Squared per-example gradient norm of this layer's covered parameters, for ``rows`` taken as
        examples of ``group`` consecutive rows each (``packed``: leaving out those in :meth:`_packed`)."""
        sub, per_row = self._modules[module_name], self._per_row(module_name, call)
        if group > 1 and isinstance(sub, nn.Embedding):
            index = call.inputs.reshape(-1)[rows].reshape(-1, group)
            if not bool((index == index[:, :1]).all()):
                raise RuntimeError(f"book-keeping clipping: the rows of one example looked up different entries of "
                                   f"{module_name!r} (an example's views must share its label)")
        total = sum(torch.linalg.vector_norm(grouped_rows(r[rows], group).flatten(1), dim=1).square()
                    for local, r in per_row.items() if not (packed and self._packable(sub, local)))
        if "weight" in self.layers[module_name] and "weight" not in per_row:  # the ghost norm
            a, g = self._tokens(module_name, call)
            a, g = _group_tokens(a[rows], group), _group_tokens(g[rows], group)
            total = total + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return total  # type: ignore[return-value]

    def squared_norms_by_part(self, record: RecordedPass, rows: slice) -> dict[str, torch.Tensor]:
        """Each example's squared gradient norm per layer (module name) and broadcast parameter, for
        ``rows`` (one part at a time: for checks; :meth:`squared_norms` is the fast total)."""
        parts = {name: self._layer_norms(name, call, rows) for name, call in record.calls.items()}
        for name, grad in record.broadcast_grads.items():
            parts[name] = torch.linalg.vector_norm(grad[rows].flatten(1), dim=1).square()
        return parts

    def squared_norms(self, record: RecordedPass, rows: slice, group: int = 1, part: str | None = None) -> torch.Tensor:
        """Squared L2 norm of each example's gradient over every covered parameter (``part``: over that
        part's parameters only, see :func:`part_of`), for ``rows``; an example is ``group`` consecutive
        rows (its views), whose gradients sum to its own."""
        count = len(range(record.rows)[rows])
        if count % group:
            raise ValueError(f"book-keeping clipping: {count} rows are not whole examples of {group} rows each")
        if part is not None and part not in self.parts():
            raise ValueError(f"book-keeping clipping: no covered parameter is in part {part!r} (parts: {self.parts()})")
        total = torch.zeros(count // group, device=self.device())
        if total.numel() == 0:
            return total
        matrix, layout = self._packed(record)
        if part is not None:
            matrix = matrix[:, self._part_columns(layout, part)]
        total = total + torch.linalg.vector_norm(grouped_rows(matrix[rows], group), dim=1).square()
        for name, call in record.calls.items():
            if part is None or part_of(name) == part:
                total = total + self._layer_norms(name, call, rows, packed=True, group=group)
        return total

    def parts(self) -> list[str]:
        """The parts of the covered parameters, in ``names`` order."""
        return list(dict.fromkeys(part_of(n) for n in self.names))

    @staticmethod
    def _part_columns(layout: list[tuple[str, torch.Size]], part: str) -> torch.Tensor:
        """The columns of the packed matrix that hold ``part``'s parameters (a boolean mask)."""
        return torch.cat([torch.full((shape.numel(),), part_of(name) == part, dtype=torch.bool)
                          for name, shape in layout]) if layout else torch.zeros(0, dtype=torch.bool)

    def device(self) -> torch.device:
        """The covered parameters' device."""
        return self._params[self.names[0]].device

    def dtype(self) -> torch.dtype:
        """The covered parameters' dtype."""
        return self._params[self.names[0]].dtype

    def weighted_sum(self, record: RecordedPass, weights: torch.Tensor | dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """``sum_r weights[r] * (row r's gradient)`` for every covered parameter, in ``names`` order.

        ``weights`` by part (``{part: (R,)}``, every part of :meth:`parts`): each parameter's sum uses
        its own part's row weights."""
        matrix, layout = self._packed(record)
        if isinstance(weights, dict):
            if set(weights) != set(self.parts()):
                raise ValueError(f"book-keeping clipping: weights given for parts {sorted(weights)}, the covered "
                                 f"parameters' parts are {sorted(self.parts())}")
            by_part = weights
            summed_by_part = {part: w @ matrix for part, w in by_part.items()}
        else:
            by_part = {part: weights for part in self.parts()}
            summed = weights @ matrix  # one product when every part has the same row weights
            summed_by_part = {part: summed for part in by_part}
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in layout:
            out[name] = summed_by_part[part_of(name)][offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        for module_name, call in record.calls.items():
            sub, own = self._modules[module_name], self.layers[module_name]
            row_weights = by_part[part_of(module_name)]
            for local, per_row in self._per_row(module_name, call).items():
                if isinstance(sub, nn.Embedding):
                    grad = torch.zeros_like(sub.weight)
                    out[own[local]] = grad.index_add_(0, call.inputs.reshape(-1), per_row * row_weights[:, None])
                elif not self._packable(sub, local):
                    out[own[local]] = (row_weights @ per_row.flatten(1)).reshape(sub.weight.shape)
            if "weight" in own and own["weight"] not in out:  # ghost layer: (w * g)^T a, one product
                a, g = self._tokens(module_name, call)
                g = (g * row_weights.view(-1, 1, 1)).reshape(-1, g.shape[-1])
                out[own["weight"]] = (g.t() @ a.reshape(-1, a.shape[-1])).reshape(sub.weight.shape)
        # A layer the pass did not reach: zero gradient.
        return {name: out[name] if name in out else torch.zeros_like(self._params[name]) for name in self.names}
