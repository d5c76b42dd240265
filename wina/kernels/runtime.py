"""What every Triton launch shares: whether Triton runs here, the per-device scratch buffers (split-K
partial sums, kept lists, attention partials) and the arrival counters, all kept alive for captured
CUDA graphs."""
from __future__ import annotations

import torch

try:  # Triton is optional: CPU installs run the torch references.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

_SCRATCH: dict = {}
_KEEP_ALIVE: list = []        # old workspaces stay alive: captured graphs may still point at them
N_COUNTERS = 1 << 16
ATTN_COUNTERS = 1 << 15       # GEMVs count in the lower half (one per output block), attention above


def counters(device) -> torch.Tensor:
    """The device's int32 arrival counters (zero between launches: the last arrival resets its own)."""
    key = ("cnt", str(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.zeros(N_COUNTERS, dtype=torch.int32, device=device)
    return _SCRATCH[key]


def workspace(device, numel: int, tag: str = "ws", dtype=torch.float32, min_numel: int = 1 << 20) -> torch.Tensor:
    """A zeroed per-device scratch buffer of at least ``numel`` elements, kept under ``tag`` (grown,
    never shrunk; the old one stays alive for graphs captured with it)."""
    key = (tag, str(device))
    ws = _SCRATCH.get(key)
    if ws is None or ws.numel() < numel:
        if ws is not None:
            _KEEP_ALIVE.append(ws)
        ws = torch.zeros(max(numel, min_numel), dtype=dtype, device=device)
        _SCRATCH[key] = ws
    return ws


def reserve_workspace(device, numel: int, tag: str = "ws") -> None:
    """Allocate scratch ahead (before a CUDA graph capture)."""
    workspace(device, numel, tag)
    counters(device)


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def n_sm(device) -> int:
    key = ("sm", str(device))
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SCRATCH[key]
