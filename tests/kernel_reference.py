"""Independent float64 numpy implementations of the StyleGAN2-ADA ops, written as direct loops.

They follow the reference's definitions literally (zero insertion, pad/crop, convolution, decimation;
upfirdn2d -> conv -> upfirdn2d for resampling convolutions) and share no code with `kernels/`.
"""

import numpy as np


def upfirdn2d_np(x, f, up=(1, 1), down=(1, 1), pad=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """x [N, H, W, C]; f 1-D (separable) or 2-D; up/down (x, y); pad (x0, x1, y0, y1)."""
    x = np.asarray(x, np.float64)
    ux, uy = up
    dx, dy = down
    px0, px1, py0, py1 = pad
    n, h, w, c = x.shape
    f = np.asarray(f, np.float64)
    f2 = np.outer(f, f) * gain if f.ndim == 1 else f * gain
    if not flip_filter:  # convolution = correlation with the flipped filter
        f2 = f2[::-1, ::-1]
    u = np.zeros((n, h * uy, w * ux, c))
    u[:, ::uy, ::ux] = x
    hp, wp = h * uy + py0 + py1, w * ux + px0 + px1
    v = np.zeros((n, hp, wp, c))
    for i in range(hp):
        for j in range(wp):
            si, sj = i - py0, j - px0
            if 0 <= si < h * uy and 0 <= sj < w * ux:
                v[:, i, j] = u[:, si, sj]
    fh, fw = f2.shape
    ho, wo = (hp - fh) // dy + 1, (wp - fw) // dx + 1
    out = np.zeros((n, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = np.einsum("nhwc,hw->nc", v[:, i * dy:i * dy + fh, j * dx:j * dx + fw], f2)
    return out


def modulated_conv2d_np(x, weight, styles, demodulate=True, up=1, down=1, padding=0, f=None):
    """Generic definition: x * s -> upfirdn2d(up, pad) -> valid correlation -> upfirdn2d(down) -> * dcoef."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    styles = np.asarray(styles, np.float64)
    kh, kw, _, cout = weight.shape
    fw = 1 if f is None else np.shape(f)[-1]
    px0 = px1 = py0 = py1 = padding
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0, py1 = px0, px1
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0, py1 = px0, px1
    xs = x * styles[:, None, None, :]
    if up > 1:
        v = upfirdn2d_np(xs, f, (up, up), (1, 1), (px0, px1, py0, py1), gain=up * up)
    else:
        v = upfirdn2d_np(xs, np.ones((1, 1)), pad=(px0, px1, py0, py1))
    n, h, w, _ = v.shape
    ho, wo = h - kh + 1, w - kw + 1
    y = np.zeros((n, ho, wo, cout))
    for i in range(ho):
        for j in range(wo):
            y[:, i, j] = np.einsum("nhwc,hwco->no", v[:, i:i + kh, j:j + kw], weight)
    if down > 1:
        y = upfirdn2d_np(y, f, down=(down, down))
    if demodulate:
        d = 1.0 / np.sqrt(np.einsum("hwio,ni->no", weight ** 2, styles ** 2) + 1e-8)
        y = y * d[:, None, None, :]
    return y


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
