"""Statistics of each linear layer's inputs, gathered with hooks while the dense block runs.

Linears that read the same input tensor (q/k/v projections, gate/up projections, an expert's gate and
up) share one accumulator: the statistics are identical, and SparseGPT's Hessian is the largest
object in memory, so sharing it matters.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

# Bytes of inputs converted (and squared) at a time: 2 MB on the CPU, where host memory is the limit
# (docs/memory.md); 128 MB on an accelerator, where a small chunk would cost thousands of kernel
# launches per batch (a 7B model's MLP input is 11008 wide: 47 fp32 tokens per 2 MB).
CHUNK_BYTES = 2**21
ACCELERATOR_CHUNK_BYTES = 2**27


class InputStatistics:
    """Running sums over calibration tokens of one input feature space: Σx² per input feature
    (Wanda), for SparseGPT Σ x xᵀ, and for DSnoT Σx.

    Several ranks must give the same statistics, bit for bit, as one process, whatever their share
    of the calibration windows and the batch size. So the sums are built from pieces that are the
    same on every rank, and those pieces are added in fp64:

    * `add_windows`, the fast path: one fp32 partial per calibration window (a window is whole on
      every rank, so its partial is the same bytes whichever rank and batch it came in), added into
      the fp64 total. The total depends on the order the partials came in only in bits far below
      what the cast to fp32 keeps.
    * `add_tokens`, for tokens that are not whole windows (a mixture-of-experts expert sees the
      tokens routed to it, a subset that depends on the batch): every token's products in fp64.

    The totals are cast to fp32 only when read."""

    def __init__(self, in_features: int, device, with_hessian: bool, with_sums: bool = False):
        self.tokens = 0
        self.squared_norms = torch.zeros(in_features, dtype=torch.float64, device=device)
        # Σx per input feature: DSnoT's expected input (its mean), and with the squares its variance.
        self.sums = torch.zeros(in_features, dtype=torch.float64, device=device) if with_sums else None
        self.hessian_sum = (torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
                            if with_hessian else None)

    def add_windows(self, windows: torch.Tensor) -> None:
        """Inputs of whole calibration windows, shape [windows, tokens, features]."""
        features = windows.shape[-1]
        self.tokens += windows.shape[0] * windows.shape[1]
        step = max(1, chunk_bytes(windows.device) // (4 * features))  # fp32 tokens per chunk
        # One F×F fp32 buffer for the batch's window partials. It is half the size of the fp64 sum
        # it is added into, and pruning reads that sum back as an fp32 F×F Hessian anyway, so it does
        # not raise SparseGPT's peak; Wanda never makes it.
        partial = (torch.empty(features, features, dtype=torch.float32, device=windows.device)
                   if self.hessian_sum is not None else None)
        for window in windows:
            # Σx² (and Σx) in chunks of a fixed number of tokens from the window's start: the
            # chunks, hence the fp32 sums, depend on the window only. A chunk's fp32 copy or square
            # is the only temporary.
            for start in range(0, window.shape[0], step):
                chunk = window[start:start + step].float()  # no copy when the inputs are fp32
                if self.sums is not None:
                    self.sums += chunk.sum(dim=0)
                squares = chunk.square_() if chunk.dtype != window.dtype else chunk.square()
                self.squared_norms += squares.sum(dim=0)
            if partial is not None:
                self._add_hessian_partial(window, partial)

    def _add_hessian_partial(self, window: torch.Tensor, partial: torch.Tensor) -> None:
        # XᵀX of the window in fp32: one matmul over its tokens when the inputs are fp32 already.
        # Other dtypes are converted in pieces of at most `features` tokens: a piece is never larger
        # than the partial itself.
        features = window.shape[-1]
        step = window.shape[0] if window.dtype == torch.float32 else features
        for start in range(0, window.shape[0], step):
            piece = window[start:start + step].float()
            partial.addmm_(piece.T, piece, beta=0 if start == 0 else 1)
        # fp64 += fp32 makes an fp64 copy of the whole right-hand side on the CPU (as large as the
        # sum): add it a few rows at a time.
        rows = max(1, chunk_bytes(partial.device) // (8 * features))
        for start in range(0, features, rows):
            self.hessian_sum[start:start + rows] += partial[start:start + rows]

    def add_tokens(self, inputs: torch.Tensor) -> None:
        """Inputs of any tokens, shape [..., features]: each token's products in fp64."""
        tokens = inputs.reshape(-1, inputs.shape[-1])
        self.tokens += tokens.shape[0]
        step = max(1, chunk_bytes(tokens.device) // (8 * tokens.shape[1]))  # fp64 tokens per chunk
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


def chunk_bytes(device: torch.device) -> int:
    return CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES


class StatisticsCollector:
    """Forward pre-hooks on a block's linears that feed their inputs into shared accumulators.

    Call `start_batch(windows, tokens_per_window)` before each batch: an input holding exactly that
    batch's tokens, in order ([windows, tokens, features], or flattened to [windows · tokens,
    features] as OPT's MLP does) is added window by window; any other input token by token.

    A mixture-of-experts expert's linears always go token by token: an expert sees the tokens routed
    to it, and when that happens to be a whole batch (in order: they are gathered by ascending
    index) the same window could go one way in one batch and the other way in another, giving sums
    that differ in the last bits between ranks or batch sizes."""

    def __init__(self, linears: dict[str, nn.Linear], with_hessian: bool, with_sums: bool = False):
        self.linears = linears
        self.with_hessian = with_hessian
        self.with_sums = with_sums
        self.stats: dict[str, InputStatistics] = {}
        self._batch = (0, 0)
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

    def start_batch(self, windows: int, tokens_per_window: int) -> None:
        """Call before each batch: its shape, and forget which input tensors the last one had."""
        self._batch = (windows, tokens_per_window)
        self._inputs_this_pass.clear()

    def _as_windows(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """`x` as [windows, tokens, features] when it holds the batch's tokens in order, else None."""
        if is_expert_linear(name):
            return None
        windows, tokens = self._batch
        if x.dim() == 3 and x.shape[:2] == (windows, tokens):
            return x
        if x.dim() == 2 and x.shape[0] == windows * tokens:
            return x.unflatten(0, (windows, tokens))  # a view: splitting the first dimension
        return None

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
            windows = self._as_windows(name, x.detach())
            if windows is not None:
                stats.add_windows(windows)
            else:
                stats.add_tokens(x.detach())
            self._inputs_this_pass.append((weakref.ref(x), stats))
        return hook


def is_expert_linear(name: str) -> bool:
    """Whether a linear, named relative to its block, is inside a mixture-of-experts expert:
    `mlp.experts.3.up_proj` (models.UnfusedExperts keeps the name of the fused module it replaces,
    and unfused experts are a ModuleList named `experts`). DeepSeek's `shared_experts` see every
    token, like any other linear."""
    return "experts" in name.split(".")
