"""StagingBuffer: named fields laid out in order in one buffer; the host views write what the
device views read."""

from __future__ import annotations

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
