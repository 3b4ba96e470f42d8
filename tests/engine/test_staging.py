"""StagingBuffer: named fields laid out in order in one buffer; the host views write what the
device views read."""

from __future__ import annotations

import pytest
import torch

from engine.staging import StagingBuffer


def test_fields_are_laid_out_in_order_and_views_share_the_buffer():
    buf = StagingBuffer(torch.device("cpu"), {
        "ids": (torch.int64, (3,)), "pos": (torch.int64, (3,)), "lens": (torch.int32, (3,)),
        "tables": (torch.int32, (3, 2)),
    })
    assert buf.offsets == {"ids": 0, "pos": 24, "lens": 48, "tables": 60}
    assert buf.host_buf.numel() == 60 + 4 * 6
    assert buf.device_buf is buf.host_buf  # on the CPU the two are one
    buf.host.ids[:] = [7, 8, 9]
    buf.host.tables[1] = [5, 6]
    buf.copy_to_device()
    assert buf.dev.ids.tolist() == [7, 8, 9] and buf.dev.pos.tolist() == [0, 0, 0]
    assert buf.dev.tables.tolist() == [[0, 0], [5, 6], [0, 0]] and buf.dev.tables.dtype == torch.int32


def test_writable_is_the_bank_on_the_cpu():
    buf = StagingBuffer(torch.device("cpu"), {"x": (torch.int64, (4,))}, banks=2)
    buf.writable(1).x[:] = 3
    buf.copy_to_device(bank=1)
    assert buf.writable(1) is buf.banks[1] and buf.writable(0) is buf.host


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_bank_is_not_rewritten_before_its_copy_has_read_it():
    """The H200 defect of batch-invariant mode (2026-11-29, experiments/batch_invariant_diag.py): its
    prefill stages group after group of pseudo-rows into one pinned bank with no sync between the
    forwards; a copy still queued behind a busy stream then read the next group's inputs. Each copy
    here waits behind a long kernel; every forward must see the values staged for it."""
    buf = StagingBuffer(torch.device("cuda"), {"x": (torch.int64, (1 << 16,))}, banks=2)
    seen = []
    for value in range(1, 6):
        buf.writable(1).x[:] = value
        torch.cuda._sleep(20_000_000)  # ~10 ms: the copy below is queued, not done, when the loop goes on
        buf.copy_to_device(bank=1)
        seen.append(buf.dev.x.clone())
    torch.cuda.synchronize()
    assert [(int(s.min()), int(s.max())) for s in seen] == [(v, v) for v in range(1, 6)]
