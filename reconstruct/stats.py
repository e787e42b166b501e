"""Statistics of each linear layer's inputs, gathered with hooks while the dense block runs.

Linears that read the same input tensor (q/k/v projections, gate/up projections, an expert's gate and
up) share one accumulator: the statistics are identical, and SparseGPT's Hessian is the largest
object in memory, so sharing it matters.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

# Inputs are converted to fp64 about this many values at a time: 2 MB on the CPU, where host memory
# is the limit (docs/memory.md); 128 MB on an accelerator, where a small chunk would cost thousands of
# kernel launches per batch (a 7B model's MLP input is 11008 wide: 23 tokens per 2^18 values).
TOKEN_CHUNK_ELEMENTS = 2**18
ACCELERATOR_TOKEN_CHUNK_ELEMENTS = 2**24


class InputStatistics:
    """Running sums over calibration tokens of one input feature space.

    The sums are kept in fp64 and cast to fp32 only when read: an fp32 running sum depends on the
    order the tokens came in, so sums made on several processes and added up would differ from one
    process's in the last bits, while fp64 sums differ far below what the cast to fp32 keeps. Several
    ranks then give the same statistics, bit for bit, as one."""

    def __init__(self, in_features: int, device, with_hessian: bool, with_sums: bool = False):
        self.tokens = 0
        self.squared_norms = torch.zeros(in_features, dtype=torch.float64, device=device)
        # Σx per input feature: DSnoT's expected input (its mean), and with the squares its variance.
        self.sums = torch.zeros(in_features, dtype=torch.float64, device=device) if with_sums else None
        self.hessian_sum = (torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
                            if with_hessian else None)

    def add(self, inputs: torch.Tensor) -> None:
        tokens = inputs.reshape(-1, inputs.shape[-1])
        self.tokens += tokens.shape[0]
        # A few tokens at a time: the fp64 copy of a whole batch of MLP inputs would be tens of MB.
        chunk = TOKEN_CHUNK_ELEMENTS if tokens.device.type == "cpu" else ACCELERATOR_TOKEN_CHUNK_ELEMENTS
        step = max(1, chunk // tokens.shape[1])
        for start in range(0, tokens.shape[0], step):
            x = tokens[start:start + step].to(torch.float64)  # always a copy: inputs are never fp64
            if self.hessian_sum is not None:
                self.hessian_sum.addmm_(x.T, x)
            if self.sums is not None:
                self.sums += x.sum(dim=0)
            self.squared_norms += x.square_().sum(dim=0)  # our own copy: squared in place

    @property
    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens: Wanda's input-feature norms."""
        return self.squared_norms.to(torch.float32).sqrt()

    @property
    def means(self) -> torch.Tensor:
        """E[x_j] over all calibration tokens."""
        if self.sums is None:
            raise RuntimeError("the input sums were not collected for this layer")
        return (self.sums / max(self.tokens, 1)).to(torch.float32)

    @property
    def variances(self) -> torch.Tensor:
        """Var[x_j] = E[x_j²] − E[x_j]² over all calibration tokens (from the fp64 sums)."""
        mean = self.sums / max(self.tokens, 1)
        return (self.squared_norms / max(self.tokens, 1) - mean.square()).clamp_(min=0).to(torch.float32)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/N · Σ x xᵀ, SparseGPT's layer-wise Hessian."""
        if self.hessian_sum is None:
            raise RuntimeError("the Hessian was not collected for this layer")
        hessian = self.hessian_sum.to(torch.float32)  # a new tensor: scaled in place, no second copy
        return hessian.mul_(2.0 / max(self.tokens, 1))


class StatisticsCollector:
    """Forward pre-hooks on a block's linears that feed their inputs into shared accumulators."""

    def __init__(self, linears: dict[str, nn.Linear], with_hessian: bool, with_sums: bool = False):
        self.linears = linears
        self.with_hessian = with_hessian
        self.with_sums = with_sums
        self.stats: dict[str, InputStatistics] = {}
        self._inputs_this_pass: list[tuple[weakref.ref, InputStatistics]] = []
        self._handles = []

    def __enter__(self):
        for name, linear in self.linears.items():
            self._handles.append(linear.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._inputs_this_pass.clear()

    def end_pass(self) -> None:
        """Call after each batch: forget which input tensors were seen (and let them be freed)."""
        self._inputs_this_pass.clear()

    def _hook(self, name: str):
        def hook(module: nn.Linear, args):
            x = args[0]
            # The same tensor object fed to several linears: add it once, share the accumulator.
            # Identity through a weak reference, not the address: a freed tensor's memory (and id)
            # can be reused by a different input of the same shape, but its weak reference is dead.
            # Holding strong references instead would keep a whole batch's MLP inputs alive.
            for seen, stats in self._inputs_this_pass:
                if seen() is x:
                    self.stats.setdefault(name, stats)
                    return
            stats = self.stats.get(name)
            if stats is None:
                stats = self.stats[name] = InputStatistics(module.in_features, x.device, self.with_hessian,
                                                                   self.with_sums)
            stats.add(x.detach())
            self._inputs_this_pass.append((weakref.ref(x), stats))
        return hook
