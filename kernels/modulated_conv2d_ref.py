"""Plain-JAX (XLA) references of modulated_conv2d, beside the Pallas op as in JAX's Pallas ops.

The "xla" implementation and its grouped-convolution twin, plus the resampling geometry and the
demodulation coefficients, which the Pallas path shares.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._args import filter_size, parse_padding, setup_filter
from .conv2d_resample import dilated_conv, polyphase_conv
from .upfirdn2d import upfirdn2d_reference

_DN = ("NHWC", "HWIO", "NHWC")
# None: the precision policy of both paths is JAX's own `jax_default_matmul_precision` (what XLA does
# on the platform by default; the tests set "highest"), so the kernels and XLA do the same arithmetic.
_PRECISION = None


def resample_padding(padding, up, down, f) -> tuple[int, int, int, int]:
    """Total (x0, x1, y0, y1) padding of conv2d_resample, including the filter's share."""
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    return px0, px1, py0, py1


def demodulation_coefficients(weight, styles, demodulate=True):
    """[N, Cout] = rsqrt(sum_{kh,kw,i} (w * s_i)^2 + 1e-8), or ones without demodulation."""
    if not demodulate:
        return jnp.ones((styles.shape[0], weight.shape[3]), jnp.float32)
    wsq = jnp.sum(jnp.square(weight.astype(jnp.float32)), axis=(0, 1))  # [Cin, Cout]
    return jax.lax.rsqrt(jnp.square(styles.astype(jnp.float32)) @ wsq + 1e-8)


def conv2d_resample_reference(x, weight, f=None, up=1, down=1, padding=0):
    """Correlation with `weight` plus up/down-sampling: the XLA path.

    up: the transposed (zero-inserting) convolution as stride-1 phase convolutions
    (`conv2d_resample.polyphase_conv`: its textbook input-dilated form has a weight gradient ~75x
    slower than its forward on XLA:CPU), then the FIR blur with gain up**2.
    down: FIR blur, then the stride-`down` convolution in polyphase form. Equal to the generic
    definition upfirdn2d(up) -> conv -> upfirdn2d(down) because the filters commute. float32 result.
    """
    px0, px1, py0, py1 = resample_padding(padding, up, down, f)
    x = x.astype(jnp.float32)
    weight = weight.astype(jnp.float32)
    if up > 1:
        y = polyphase_conv(x, weight, up, 1, (px0, px1, py0, py1), precision=_PRECISION)
        return upfirdn2d_reference(y, f, gain=up * up)
    if down > 1:
        # polyphase too: the strided convolution's second derivatives (R1) run ~10x slower on XLA:CPU
        x = upfirdn2d_reference(x, f, padding=(px0, px1, py0, py1))
        return polyphase_conv(x, weight, 1, down, (0, 0, 0, 0), precision=_PRECISION)
    # a plain padded convolution: XLA:CPU's own gradients of it are fast at every order
    return dilated_conv(x, weight, 1, 1, (px0, px1, py0, py1), precision=_PRECISION)


def modulated_conv2d_reference(x, weight, styles, demodulate=True, up=1, down=1, padding=0,
                               resample_filter=None):
    """The "xla" implementation: scale x by the styles, one shared-weight conv, scale by dcoef."""
    f = default_filter(resample_filter, up, down)
    dcoef = demodulation_coefficients(weight, styles, demodulate)
    xs = x.astype(jnp.float32) * styles.astype(jnp.float32)[:, None, None, :]
    y = conv2d_resample_reference(xs, weight, f, up, down, padding)
    return (y * dcoef[:, None, None, :]).astype(x.dtype)


def modulated_conv2d_grouped_reference(x, weight, styles, demodulate=True, up=1, down=1,
                                       padding=0, resample_filter=None):
    """The reference's fused formulation: per-sample weights, batch folded into conv groups."""
    f = default_filter(resample_filter, up, down)
    n, h, w, cin = x.shape
    kh, kw, _, cout = weight.shape
    wn = weight.astype(jnp.float32)[None] * styles.astype(jnp.float32)[:, None, None, :, None]
    wn = wn * demodulation_coefficients(weight, styles, demodulate)[:, None, None, None, :]
    wn = wn.transpose(1, 2, 3, 0, 4).reshape(kh, kw, cin, n * cout)  # groups = samples
    xg = x.astype(jnp.float32).transpose(1, 2, 0, 3).reshape(1, h, w, n * cin)
    px0, px1, py0, py1 = resample_padding(padding, up, down, f)
    conv = functools.partial(jax.lax.conv_general_dilated, dimension_numbers=_DN,
                             feature_group_count=n, precision=_PRECISION)
    if up > 1:
        y = conv(xg, wn, (1, 1), ((py0, py1 + up - 1), (px0, px1 + up - 1)), lhs_dilation=(up, up))
        y = upfirdn2d_reference(y, f, gain=up * up)
    elif down > 1:
        y = conv(upfirdn2d_reference(xg, f, padding=(px0, px1, py0, py1)), wn, (down, down), "VALID")
    else:
        y = conv(xg, wn, (1, 1), ((py0, py1), (px0, px1)))
    _, ho, wo, _ = y.shape
    return y.reshape(ho, wo, n, cout).transpose(2, 0, 1, 3).astype(x.dtype)


def default_filter(resample_filter, up, down):
    if resample_filter is None:
        return jnp.asarray(setup_filter([1, 3, 3, 1])) if (up > 1 or down > 1) else None
    return jnp.asarray(resample_filter, jnp.float32)
