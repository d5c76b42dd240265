"""Layers on several devices: the greedy allocation's layers are independent (each starts from its
dense input), so each device takes one layer at a time. A layer that runs away from the model's
device moves there and back (its weights only; hooks and buffers go with it); results come back in
layer order, so a plan is written and resumed as with one device.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from .adapters import decoder_layers
from .calibrate import LayerRunner, _nullctx
from .errors import InvalidArgument


def layer_devices(devices: Optional[Sequence], home: torch.device, dispatched: bool = False) -> list[torch.device]:
    """The devices the layers' greedies run on: ``devices`` as given; by default every visible GPU
    (home first) when the model is on a GPU, else the model's own device. A model spread over
    devices (``device_map``) keeps its layers where they are: one worker."""
    if devices is not None:
        out = [torch.device(d) for d in devices]
        if not out:
            raise InvalidArgument("devices: give at least one device")
        if dispatched and len(out) > 1:
            raise InvalidArgument("a model loaded with a device_map allocates on its own devices; "
                                  "give one device (or none)")
        return out[:1] if dispatched else out
    if dispatched:
        return [home]
    if home.type == "cuda":
        home = torch.device("cuda", home.index if home.index is not None else torch.cuda.current_device())
        return [home] + [torch.device("cuda", k) for k in range(torch.cuda.device_count()) if k != home.index]
    return [home]


class SubRunner:
    """What LayerTrials reads of a LayerRunner, on another device."""

    def __init__(self, runner: LayerRunner, device: torch.device) -> None:
        self.chunk_tokens, self.device = runner.chunk_tokens, device
        self.kwargs = {k: _to(v, device) for k, v in runner.kwargs.items()}


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


@contextmanager
def layer_on_device(model, runner: LayerRunner, i: int, dev: torch.device):
    """Run decoder layer i on ``dev``: the layer moves there (and back), grad off, ``dev`` current."""
    home = runner.device
    block = decoder_layers(model)[i]
    same = torch.device(dev) == torch.device(home)
    gpu = torch.cuda.device(dev) if dev.type == "cuda" else _nullctx()
    with torch.no_grad(), gpu:
        if same:
            yield runner
            return
        block.to(dev)
        try:
            yield SubRunner(runner, dev)
        finally:
            block.to(home)


class LayerPool:
    """Layers' greedies on a pool of devices, one layer per device at a time; results come back in
    layer order. With one device the work runs in the caller's thread."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = list(devices)
        self.free = list(devices)
        self.running: dict = {}                  # future -> (layer, device)
        self.results: dict[int, object] = {}
        self.order: list[int] = []
        self.ex = ThreadPoolExecutor(len(devices)) if len(devices) > 1 else None

    def __enter__(self) -> "LayerPool":
        return self

    def __exit__(self, *exc) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)

    def submit(self, i: int, fn, *args) -> None:
        self.order.append(i)
        if self.ex is None:
            self.results[i] = fn(i, *args, self.devices[0])
            return
        while not self.free:
            self._collect(block=True)
        dev = self.free.pop(0)
        self.running[self.ex.submit(fn, i, *args, dev)] = (i, dev)

    def _collect(self, block: bool) -> None:
        if not self.running:
            return
        done, _ = wait(list(self.running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for f in done:
            i, dev = self.running.pop(f)
            self.free.append(dev)
            self.results[i] = f.result()         # a worker's error (or Cancelled) is raised here

    def finished(self):
        """The results ready so far, in layer order."""
        self._collect(block=False)
        while self.order and self.order[0] in self.results:
            i = self.order.pop(0)
            yield i, self.results.pop(i)

    def drain(self):
        while self.running:
            self._collect(block=True)
        yield from self.finished()
