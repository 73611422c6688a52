"""The backend protocol every backend implements, with the capabilities it declares.

    class MyBackend(Backend):
        name = "mine"
        formats = ("mxfp4",)          # the formats it can ever run
        capturable = True              # forward() can be captured in a CUDA graph
        tunable = False                # offers tune() (kernel launch configurations)
        first_use = ""                 # what the first prepare costs, for `qmoe env` ("JIT build, ~10 s")

        def _supports(self, spec, fmt, device) -> Support: ...   # may raise: supports() turns it into a reason
        def _prepare(self, spec, weights) -> Prepared: ...        # called only when supports() said yes
        def forward(self, prepared, x, topk_ids, topk_weights, out, shared_output=None): ...

`supports` is the one probe: it never raises, refuses formats outside `formats` by itself and
turns an exception inside `_supports` (a broken optional import, say) into the reason.
`prepare` runs the probe first and raises ValueError with its reason, so a backend never fails
deep inside for a case it could have refused. Commands rely only on these declared attributes,
never on `getattr` probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ..spec import MoESpec
from ..support import Support
from ..weights import ExpertWeights


@dataclass(eq=False)
class Prepared:
    """A backend's own copy of the weights, made once by `prepare`.

    backend: the name of the backend that made it (forward refuses another's);
    spec, format, device: what it was made for;
    tensors: the backend's tensors by name (layout documented by that backend; they count
             towards `nbytes`);
    meta: what made the layout (padding, block shapes, library versions) and objects the
          forward needs (never counted as bytes); a layout is only valid for the meta it was
          made with.
    """

    backend: str
    spec: MoESpec
    format: str
    device: torch.device
    tensors: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the backend's own tensors (the canonical weights are not counted)."""
        seen, n = set(), 0
        for t in self.tensors.values():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
        return n


class Backend:
    """Base class: subclasses set the declared attributes and implement `_supports`,
    `_prepare` and `forward` (and `tune` when `tunable`)."""

    name: str = ""
    formats: tuple = ()
    """Formats this backend can ever run (others are refused before `_supports` is asked)."""
    capturable: bool = True
    """Whether `forward` can be captured in a CUDA graph (no host synchronization)."""
    tunable: bool = False
    """Whether the backend offers `tune` (kernel-level launch configurations, `qmoe tune --kernels`)."""
    first_use: str = ""
    """What the first `prepare` costs beyond copying weights (JIT compilation, say), for `qmoe env`."""
    poisons_bad_ids: bool = False
    """Whether forward itself turns the output row of a token naming an id outside [-1, E) into
    NaN without reading or writing out of bounds (else qmoe.MoE guards the ids for it)."""

    def supports(self, spec: MoESpec, fmt: str, device) -> Support:
        """Whether this backend can run `fmt` weights for `spec` on `device`; never raises."""
        if fmt not in self.formats:
            offered = ", ".join(self.formats) or "no format"
            return Support(False, f"{self.name} runs {offered} weights; format {fmt} is not offered"
                                  f"{self.format_hint(fmt)}")
        try:
            sup = self._supports(spec, fmt, torch.device(device))
        except Exception as e:  # a probe that breaks is a reason, never a crash
            return Support(False, f"probing {self.name} failed: {type(e).__name__}: {e}")
        return Support(bool(sup[0]), str(sup[1]))

    def require(self, spec: MoESpec, fmt: str, device) -> Support:
        """supports(), or ValueError naming the backend and the reason (first step of prepare)."""
        sup = self.supports(spec, fmt, device)
        if not sup.ok:
            raise ValueError(f"backend: {self.name} cannot run format {fmt} on {device}: {sup.reason}")
        return sup

    def prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        """The backend's layout of `weights`, made once (at load)."""
        if not isinstance(weights, ExpertWeights):
            raise ValueError(f"weights: expected an ExpertWeights, got {type(weights).__name__}")
        self.require(spec, weights.format, weights.device)
        return self._prepare(spec, weights)

    def forward(self, prepared: Prepared, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, out: torch.Tensor,
                shared_output: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the experts into `out` and return it.

        x: [M, H] bf16 / fp16 / fp32 contiguous; topk_ids: [M, k] int32 in [-1, E) (-1: no
        expert); topk_weights: [M, k] fp32; out: [M, H] of x's dtype, contiguous (every element
        written); shared_output: [M, H] or None (added). No host synchronization when
        `capturable`.
        """
        raise NotImplementedError

    def forward_batched(self, prepared: Prepared, x: torch.Tensor, counts: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """Compute the experts on the batched activation format of low-latency all-to-all
        libraries (per-expert buffers) into `out` and return it.

        x: [E, T, H] bf16 / fp16 / fp32 contiguous, E = prepared.spec.num_experts: rows
        0..counts[e]-1 of x[e] are tokens for expert e, the rest unused (any content, never
        read into a result); counts: [E] int32 or int64 on x's device (values below 0 act as
        0, above T as T); out: [E, T, H] of x's dtype, contiguous: row t of out[e] is expert
        e's output for that row with weight 1 (no combine across experts), rows past the count
        0. No host synchronization when `capturable`.

        This fallback, which every backend has: flatten x to [E * T, H] rows, name expert e
        in slot 0 of the rows in use and -1 in the unused rows and in the other top_k - 1
        slots, weights 1, and run `forward` (whose rows of all -1 ids are 0). A backend with a
        native batched path overrides it.
        """
        E, T, H = x.shape
        k = prepared.spec.top_k
        used = torch.arange(T, device=x.device).unsqueeze(0) < counts.unsqueeze(1)   # [E, T]
        expert = torch.arange(E, dtype=torch.int32, device=x.device).unsqueeze(1)
        ids = torch.full((E * T, k), -1, dtype=torch.int32, device=x.device)
        ids[:, 0] = torch.where(used, expert, -1).view(E * T)
        weights = torch.ones(E * T, k, dtype=torch.float32, device=x.device)
        self.forward(prepared, x.view(E * T, H), ids, weights, out.view(E * T, H))
        return out

    def format_hint(self, fmt: str) -> str:
        """Text appended to the refusal of a format this backend does not run (where to go
        instead), e.g. " (int4: use marlin)"; empty by default."""
        return ""

    def runner(self, prepared: Prepared, num_tokens: int):
        """forward(prepared, ...) for calls of num_tokens tokens, with whatever depends on the
        token count (a launch configuration, say) resolved now rather than per call:
        run(x, topk_ids, topk_weights, out, shared_output=None) -> out."""
        def run(x, topk_ids, topk_weights, out, shared_output=None):
            return self.forward(prepared, x, topk_ids, topk_weights, out, shared_output)

        return run

    def tune(self, spec: MoESpec, fmt: str, ms, device, **kwargs) -> dict:
        """Kernel-level tuning (only when `tunable`)."""
        raise NotImplementedError(f"{self.name} does not tune its kernels")

    def _supports(self, spec: MoESpec, fmt: str, device: torch.device) -> Support:
        raise NotImplementedError

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> Prepared:
        raise NotImplementedError

    def check_prepared(self, prepared) -> None:
        """ValueError unless `prepared` was made by this backend."""
        if getattr(prepared, "backend", None) != self.name:
            raise ValueError(f"prepared: expected a layout prepared by {self.name}, got one by "
                             f"{getattr(prepared, 'backend', type(prepared).__name__)}")

    def __repr__(self):
        return f"<qmoe backend {self.name}>"


def cuda_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, or None for a non-CUDA device or no GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def warm_up_ids(spec: MoESpec, device) -> torch.Tensor:
    """[1, top_k] int32 ids 0, 1, ..., top_k - 1 for a warm-up forward, -1 past num_experts (an
    expert-parallel rank's local spec can have more slots than experts)."""
    ids = torch.arange(spec.top_k, dtype=torch.int32, device=device)
    return torch.where(ids < spec.num_experts, ids, -1).unsqueeze(0)


def output_buffer(out: torch.Tensor, cols: int) -> torch.Tensor:
    """Where a kernel that writes bf16 rows of `cols` columns should write a call's result: out
    itself when it can (bf16, contiguous, cols == out.shape[1]), else a new bf16 [M, cols] tensor
    on out's device that `finish_output` copies from. out: [M, H] float."""
    if cols == out.shape[1] and out.dtype == torch.bfloat16 and out.is_contiguous():
        return out
    return torch.empty(out.shape[0], cols, dtype=torch.bfloat16, device=out.device)


def finish_output(out: torch.Tensor, y: torch.Tensor, shared_output: torch.Tensor | None = None) -> torch.Tensor:
    """out <- the first H columns of the kernel's result y ([M, >= H]; nothing is copied when y
    is out itself), then + shared_output ([M, H] or None). Returns out."""
    if y.data_ptr() != out.data_ptr():
        out.copy_(y[:, :out.shape[1]])
    if shared_output is not None:
        out.add_(shared_output)
    return out
