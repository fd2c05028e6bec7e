"""The op counter behind benchmarks/step_cost.py: known ops, known bytes."""

import torch
from op_count import OpCounter


def test_counts_work_ops_with_their_bytes_and_skips_views():
    x, y = torch.ones(1000), torch.ones(1000)
    with OpCounter() as counter:
        z = x + y  # reads 2 x 4000 bytes, writes 4000
        z.view(10, 100).t()  # views: no work
        torch.empty(10**6)  # an allocation: no work
        z.mul_(2)  # in place: reads and writes z
    count = counter.count
    assert (count.ops, count.bytes) == (2, 12000 + 8000)
    assert dict(count.by_op) == {"add": 1, "mul_": 1}
    assert count.passes(4000) == 5


def test_out_argument_is_written_not_read():
    x, out = torch.ones(100, dtype=torch.float64), torch.empty(100, dtype=torch.float64)
    with OpCounter() as counter:
        torch.neg(x, out=out)
    assert counter.count.bytes == 800 + 800


def test_host_reads_are_syncs_and_backward_is_seen():
    x = torch.ones(8, requires_grad=True)
    with OpCounter() as counter:
        loss = (x * 3).sum()
        (grad,) = torch.autograd.grad(loss, x)
        flag = bool(loss > 0)
        value = loss.item()
    assert counter.count.syncs == 2 and flag and value == 24
    assert torch.equal(grad, torch.full((8,), 3.0))
    # forward mul and sum; backward expands the grad and multiplies it by 3
    assert counter.count.by_op["mul"] == 2 and counter.count.by_op["sum"] == 1


def test_meta_tensors_count_at_full_size():
    x = torch.empty(256, 3, 224, 224, device="meta")
    with OpCounter() as counter:
        x * 2
    assert counter.count.bytes == 2 * x.numel() * 4
