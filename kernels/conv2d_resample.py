"""The XLA path of the resampling convolution, in polyphase (sub-pixel) form.

A stride-2 transposed convolution written as `lax.conv` with `lhs_dilation` (the textbook form) is
fast forward on XLA:CPU, but its weight gradient is a convolution of two dilated operands that
XLA:CPU runs ~75x slower than the forward; a stride-2 convolution has the mirror problem (its input
gradient is input-dilated). Both disappear in polyphase form, the form the Pallas kernels already
use (`kernels._phases`):

    out phase q = sum over input phases r of  valid_conv(x_r[window(q, r)], w[taps(q, r)])

Each (output phase, input phase) pair owns a dense sub-kernel of the weight (for a 3x3 kernel and
up = 2: 2x2, 2x1, 1x2 and 1x1, nine taps in all, so no multiply by an inserted zero), every
convolution is stride-1 and undilated, and so are both of its gradients. The output phases are
interleaved by a reshape (depth-to-space). Equal to the textbook form to float rounding; the tests
check both against float64 loops, values and first and second derivatives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _phases

_DN = ("NHWC", "HWIO", "NHWC")


def conv_stride1(x: jax.Array, weight: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]],
                 precision=None) -> jax.Array:
    """Stride-1 correlation with explicit (low, high) padding per spatial dim (negative crops).

    Its gradients are chosen for XLA:CPU, where `lax.conv`'s own weight gradient is fast or 25x
    slow depending on the shapes and the derivative order: the input gradient is this same op on
    the flipped, transposed weight (so every order stays a padded stride-1 convolution) and the
    weight gradient is one matrix product per tap, whose derivatives are products again. Negative
    padding is applied as a crop first (XLA:CPU's fast convolution takes only padding >= 0).
    """
    (ly, hy), (lx, hx) = padding
    h, w = x.shape[1], x.shape[2]
    x = x[:, max(0, -ly):h - max(0, -hy), max(0, -lx):w - max(0, -hx)]
    return _conv_padded(x, weight, ((max(0, ly), max(0, hy)), (max(0, lx), max(0, hx))), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_padded(x, weight, padding, precision):
    return _conv(x, weight, padding, precision)


def _conv(x, weight, padding, precision):
    return jax.lax.conv_general_dilated(x, weight, (1, 1), padding, dimension_numbers=_DN,
                                        precision=precision,
                                        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


def _conv_stride1_fwd(x, weight, padding, precision):
    return _conv(x, weight, padding, precision), (x, weight)


def _conv_stride1_bwd(padding, precision, residuals, g):
    x, weight = residuals
    kh, kw = weight.shape[:2]
    (ly, hy), (lx, hx) = padding
    flipped = jnp.flip(weight, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)
    dx = conv_stride1(g, flipped, ((kh - 1 - ly, kh - 1 - hy), (kw - 1 - lx, kw - 1 - hx)), precision)
    return dx.astype(x.dtype), _weight_grad_by_taps(x, g, padding, kh, kw, precision).astype(weight.dtype)


_conv_padded.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


def _weight_grad_by_taps(x, g, padding, kh, kw, precision):
    """dW[a, b] = sum_{n, i, j} pad(x)[n, i + a, j + b, :]^T g[n, i, j, :]: kh * kw matrix products."""
    (ly, hy), (lx, hx) = padding
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ly, hy, 0), (lx, hx, 0), (0, 0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    taps = [jax.lax.dot_general(xp[:, a:a + ho, b:b + wo, :], g, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                precision=precision, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
            for a in range(kh) for b in range(kw)]
    return jnp.stack(taps).reshape(kh, kw, x.shape[3], g.shape[3])


def _sub_kernels(plan_y: _phases.Plan1D, plan_x: _phases.Plan1D):
    """{(q, r): (oy0, ox0, ky, kx)}: the dense taps each output phase q reads from input phase r.

    For fixed (q, r) the plan's offsets are consecutive (taps step by `up` in the zero-inserted
    signal, i.e. by one input sample), so the taps form a dense sub-kernel read at offset (oy0, ox0).
    """
    out = {}
    for qy, taps_y in enumerate(plan_y.taps):
        for qx, taps_x in enumerate(plan_x.taps):
            for ry in range(plan_y.down):
                for rx in range(plan_x.down):
                    ty = [(k, o) for k, r, o in taps_y if r == ry]
                    tx = [(k, o) for k, r, o in taps_x if r == rx]
                    if not ty or not tx:
                        continue
                    for taps in (ty, tx):
                        offsets = [o for _, o in taps]
                        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets
                    out[(qy * plan_x.up + qx, ry * plan_x.down + rx)] = (
                        ty[0][1], tx[0][1], np.array([k for k, _ in ty]), np.array([k for k, _ in tx]))
    return out


def polyphase_conv(x: jax.Array, weight: jax.Array, up: int, down: int,
                   pads: tuple[int, int, int, int], precision=None) -> jax.Array:
    """correlate(pad(zero_insert(x, up), pads), weight)[::down, ::down], NHWC.

    x: [N, H, W, Cin]; weight: [kh, kw, Cin, Cout]; pads = (x0, x1, y0, y1) of the zero-inserted
    signal (negative crops), as `_phases.plan_1d` takes them. Accumulates in at least float32.

    Each phase convolution pads (or crops) its input through the convolution's own padding rather
    than reading a window of a pre-padded copy: XLA:CPU differentiates the padded convolution twice
    (R1, path length) ~20x faster than a "valid" one on a padded operand.
    """
    n, h, w, _ = x.shape
    kh, kw, _, cout = weight.shape
    px0, px1, py0, py1 = pads
    plan_y = _phases.plan_1d(h, up, down, py0, py1, kh, "conv2d_resample (height)")
    plan_x = _phases.plan_1d(w, up, down, px0, px1, kw, "conv2d_resample (width)")
    rows, cols = plan_y.out_per_phase, plan_x.out_per_phase
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    subs = _sub_kernels(plan_y, plan_x)
    phases = []
    for q in range(plan_y.up * plan_x.up):
        acc = None
        for r in range(plan_y.down * plan_x.down):
            if (q, r) not in subs:
                continue
            oy, ox, ky, kx = subs[(q, r)]
            ry, rx = divmod(r, plan_x.down)
            # input phase r: xr[i] = x[down * i + r]; the plan reads it shifted by `lead`
            xr = x if plan_y.down * plan_x.down == 1 else x[:, ry::plan_y.down, rx::plan_x.down]
            lo_y, lo_x = plan_y.lead - oy, plan_x.lead - ox
            hi_y = rows + len(ky) - 1 - xr.shape[1] - lo_y
            hi_x = cols + len(kx) - 1 - xr.shape[2] - lo_x
            term = conv_stride1(xr, weight[ky][:, kx], ((lo_y, hi_y), (lo_x, hi_x)), precision)
            acc = term if acc is None else acc + term
        phases.append(jnp.zeros((n, rows, cols, cout), acc_dtype) if acc is None else acc)
    uy, ux = plan_y.up, plan_x.up
    y = jnp.stack(phases, axis=3) if len(phases) > 1 else phases[0][:, :, :, None]
    y = y.reshape(n, rows, cols, uy, ux, cout).transpose(0, 1, 3, 2, 4, 5)  # depth-to-space
    return _phases.merge_phases(y, plan_y, plan_x)


def dilated_conv(x: jax.Array, weight: jax.Array, up: int, down: int,
                 pads: tuple[int, int, int, int], precision=None) -> jax.Array:
    """The textbook form of `polyphase_conv` (input dilation, window strides): kept to compare
    speed in the benchmarks and values in the tests."""
    px0, px1, py0, py1 = pads
    return jax.lax.conv_general_dilated(
        x, weight, (down, down), ((py0, py1 + up - 1), (px0, px1 + up - 1)), lhs_dilation=(up, up),
        dimension_numbers=_DN, precision=precision,
        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


__all__ = ["polyphase_conv", "dilated_conv"]
