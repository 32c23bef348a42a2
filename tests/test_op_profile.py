"""The op-by-op profile of bench-stylegan2 --profile: what each compiled op is, and where time goes."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.conv2d_resample import conv_stride1
from viscoin_jax.benchmarks import op_profile


def _conv_dot_loss(x, w, m):
    y = jnp.tanh(conv_stride1(x, w, ((1, 1), (1, 1))))  # [N, H, W, C]
    return jnp.sum(jnp.square(jnp.mean(y, axis=(1, 2)) @ m))  # a small product: the conv dominates


def _inputs(seed, n, h, w, cin, cout, outputs):
    """Random (x, conv weight, product matrix) for `_conv_dot_loss` on an n x h x w x cin input."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32),
            jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32),
            jnp.asarray(rng.normal(size=(cout, outputs)), jnp.float32))


def _compiled(fn, *args):
    jitted = jax.jit(fn)
    return jitted, jitted.lower(*args).compile().as_text()


def test_hlo_index_tells_forward_from_backward_and_names_the_function():
    x, w, m = _inputs(0, 2, 7, 5, 3, 4, 6)
    _, fwd_text = _compiled(_conv_dot_loss, x, w, m)
    _, bwd_text = _compiled(jax.grad(_conv_dot_loss, argnums=(0, 1, 2)), x, w, m)

    def kinds(text):
        index = op_profile.HloIndex(text)
        out = {}
        for name, (opcode, _, op_name, _) in index.instr.items():
            if opcode in ("convolution", "dot", "fusion"):
                out[name] = index.bucket(name)
        return index, out

    _, fwd = kinds(fwd_text)
    fwd_buckets = {b for b, _, _ in fwd.values()}
    assert "conv forward" in fwd_buckets and "conv backward" not in fwd_buckets
    assert all(order == 0 for _, order, _ in fwd.values())
    assert any(b == "conv forward" and where.startswith("conv2d_resample.py:") for b, _, where in fwd.values())

    index, bwd = kinds(bwd_text)
    # the input gradient is conv_stride1 again (a convolution), the weight gradient per-tap products
    assert any(b == "conv backward" and order == 1 for b, order, _ in bwd.values())
    # every backward instruction carries transpose( in its op_name, and only those get order >= 1
    for name, (bucket, order, _) in bwd.items():
        assert (order >= 1) == ("transpose(" in index.instr[name][2])
    assert op_profile.HloIndex(bwd_text).bucket("no_such_op.7") == ("other", 0, "-")


def test_trace_jax_accounts_for_the_run_and_ranks_the_convolution_first():
    x, w, m = _inputs(1, 4, 45, 37, 64, 64, 3)
    jitted, text = _compiled(_conv_dot_loss, x, w, m)
    jax.block_until_ready(jitted(x, w, m))
    t0 = time.perf_counter()
    # three calls in one trace: a loaded machine may still lose one op's end event
    buckets, rows = op_profile.trace_jax(lambda: [jitted(x, w, m) for _ in range(3)], [text])
    wall = time.perf_counter() - t0
    assert rows and sum(buckets.values()) == pytest.approx(sum(r[0] for r in rows))
    assert 0 < sum(buckets.values()) < wall  # op events happen inside the traced call
    index = op_profile.HloIndex(text)
    assert all(r[1].split(":")[0] in index.instr for r in rows)  # every event is an op of the module
    # a 64 -> 64 channel 3x3 convolution on 4x45x37 outweighs the rest of this function
    assert rows[0][2] == "conv forward"
    assert buckets["conv forward"] > 0.5 * sum(buckets.values())


@pytest.mark.parametrize("name, bucket", [
    ("aten::convolution_backward", "conv backward"), ("aten::mkldnn_convolution", "conv forward"),
    ("aten::conv2d", "conv forward"), ("aten::mm", "matmul"), ("aten::addmm", "matmul"),
    ("aten::add_", "element-wise"), ("aten::leaky_relu", "element-wise"), ("aten::sum", "reduction"),
    ("aten::copy_", "copy / layout"), ("ConvolutionBackward0", "autograd"),
])
def test_torch_bucket(name, bucket):
    assert op_profile.torch_bucket(name) == bucket


def test_torch_profile_splits_a_convolution_step():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(4, 32, 29, 31)

    def run():
        conv.zero_grad(set_to_none=True)
        torch.tanh(conv(x)).square().sum().backward()
    run()
    buckets = op_profile.torch_profile(run)
    assert buckets.get("conv forward", 0) > 0 and buckets.get("conv backward", 0) > 0
    # only named buckets; no ranking of them: on a loaded machine one preempted copy outlasts the backward
    assert set(buckets) <= set(op_profile.BUCKETS)


def test_fair_share_splits_overlapping_intervals_like_a_fine_time_grid():
    rng = np.random.default_rng(2)
    ops = [f"op{i}" for i in range(7)]
    intervals = []
    for _ in range(40):
        t0 = int(rng.integers(0, 1000))
        intervals.append((t0, t0 + int(rng.integers(0, 300)), str(rng.choice(ops))))
    got = op_profile.fair_share(intervals)
    # reference: one-nanosecond grid, each instant's time divided by the number of intervals covering it
    grid = np.arange(0, 1400)
    cover = np.zeros((len(intervals), grid.size))
    for k, (t0, t1, _) in enumerate(intervals):
        cover[k] = (grid >= t0) & (grid < t1)
    n = cover.sum(0)
    share = np.divide(cover, n, out=np.zeros_like(cover), where=n > 0).sum(1) * 1e-9
    want = {}
    for k, (_, _, op) in enumerate(intervals):
        want[op] = want.get(op, 0.0) + share[k]
    for op in set(want) | set(got):
        assert got.get(op, 0.0) == pytest.approx(want.get(op, 0.0), abs=1e-15)
    assert sum(got.values()) == pytest.approx((n > 0).sum() * 1e-9)  # adds up to the busy time


def test_profile_table_lists_each_bucket_once(capsys):
    op_profile.print_profile_table({"conv forward": 2.0, "matmul": 1.0}, {"conv forward": 1.0, "other": 0.5,
                                                                          "element-wise": 0.25}, 3.5, 2.0)
    lines = capsys.readouterr().out.splitlines()
    names = [line.split("  ")[0].strip() for line in lines[2:] if not line.startswith(("profiled", "wall"))]
    assert sorted(names) == ["conv forward", "element-wise", "matmul", "other"]
    assert any(line.startswith("conv forward") and line.rstrip().endswith("2.00x") for line in lines)
