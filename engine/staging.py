"""One staging buffer for a step's inputs: named int64 and int32 fields in one host buffer (pinned
on CUDA) and its device copy. A step writes the host copy through numpy views and moves it with one
asynchronous host-to-device copy, instead of building a tensor, a pageable copy and a fill per
input; the device views are a CUDA graph's static inputs. On the CPU the two are one buffer.

A second host buffer (``banks=2``) of the same layout copies into the same device buffer: two
stagings of one round that no sync separates (a draft's catch-up forward, then its decode steps)
must not write one pinned buffer, whose earlier copy may not have run yet. Nor may one bank be
written twice in a round: ``writable(bank)`` waits until the bank's last copy has read it (a CUDA
event recorded behind each copy), so a writer that stages forward after forward with no sync between
them (batch-invariant mode's prefill in groups of pseudo-rows) cannot overwrite what an earlier
forward's copy has yet to read."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch


def device_index(device: torch.device) -> int | None:
    """A CUDA device's index (the current device where it names none), None off CUDA. Pass it to
    torch.cuda.current_stream(index): without one torch looks the current device up through ~10
    Python calls (~20 us a call on the H200's host), on the host between two GPU steps."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class StagingBuffer:
    def __init__(self, device: torch.device, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 banks: int = 1) -> None:
        """``fields``: name -> (dtype, shape), laid out in order (put the int64 fields first, so
        every field stays aligned); ``banks``: host buffers (``host`` is bank 0's views)."""
        self.offsets: dict[str, int] = {}
        nbytes = 0
        for name, (dtype, shape) in fields.items():
            assert nbytes % dtype.itemsize == 0, f"field {name} is not aligned"
            self.offsets[name] = nbytes
            nbytes += dtype.itemsize * math.prod(shape)
        on_cuda = device.type == "cuda"
        self.host_buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=on_cuda)
        self.device_buf = self.host_buf.to(device) if on_cuda else self.host_buf
        self.fields = fields
        # host.<name>: numpy views to write; dev.<name>: the device tensors a forward reads.
        self.host_bufs = [self.host_buf] + [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=on_cuda)
                                            for _ in range(banks - 1)]
        self.banks = [SimpleNamespace(**{n: t.numpy() for n, t in self._views(b).items()}) for b in self.host_bufs]
        self.host = self.banks[0]
        self.dev = SimpleNamespace(**self._views(self.device_buf))
        # Per bank (CUDA only): an event recorded behind its last copy; one never recorded is complete.
        self._copied = [torch.cuda.Event() for _ in self.host_bufs] if on_cuda else []
        self.index = device_index(device)  # the current stream's lookup per copy (device_index)

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (dtype, shape) in self.fields.items():
            start = self.offsets[name]
            out[name] = buf[start : start + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
        return out

    def writable(self, bank: int = 0) -> SimpleNamespace:
        """Host buffer ``bank``'s views, once its last copy has read it (at once where a sync has
        passed since, as between two decode steps; the wait where none has)."""
        if self._copied:
            self._copied[bank].synchronize()
        return self.banks[bank]

    def copy_to_device(self, nbytes: int | None = None, bank: int = 0) -> None:
        """Start the copy of the first ``nbytes`` (all by default) of host buffer ``bank``. Write
        that host buffer again only through ``writable(bank)``."""
        src = self.host_bufs[bank]
        if self.device_buf is not src:
            n = src.numel() if nbytes is None else nbytes
            self.device_buf[:n].copy_(src[:n], non_blocking=True)
            if self._copied:  # on the CPU the copy is done when it returns
                self._copied[bank].record(torch.cuda.current_stream(self.index))
