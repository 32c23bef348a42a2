"""Attribution methods against independent references: torch float64 autograd on a mirrored model,
closed forms (linear / quadratic / cubic models), hand-written numpy Grad-CAM and occlusion loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from viscoin_jax.explain import attributions as A

# ---------------------------------------------------------------------------------------------
# A tiny smooth conv classifier, in JAX and mirrored in torch (float64) as the reference.

H, W, C, HID, K = 7, 9, 3, 6, 5


def _weights(seed=0):
    r = np.random.default_rng(seed)
    return {"w1": r.normal(0, 0.5, (3, 3, C, HID)).astype(np.float32), "b1": r.normal(0, 0.1, HID).astype(np.float32),
            "w2": r.normal(0, 1.0, (HID, K)).astype(np.float32), "b2": r.normal(0, 0.1, K).astype(np.float32)}


def jax_model(p):
    def fn(x):
        h = jax.lax.conv_general_dilated(x, p["w1"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(h + p["b1"])
        return jnp.mean(h, axis=(1, 2)) @ p["w2"] + p["b2"]
    return fn


def torch_model(p):
    w1 = torch.tensor(p["w1"], dtype=torch.float64).permute(3, 2, 0, 1)
    b1, w2, b2 = (torch.tensor(p[k], dtype=torch.float64) for k in ("b1", "w2", "b2"))

    def fn(x):  # NHWC float64 tensor
        h = torch.tanh(torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), w1, b1, padding=1))
        return h.mean(dim=(2, 3)) @ w2 + b2
    return fn


def torch_grad(fn, x, targets, score="logit"):
    x = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    out = fn(x)
    if score == "prob":
        out = torch.softmax(out, -1)
    out[torch.arange(len(targets)), torch.tensor(np.asarray(targets))].sum().backward()
    return x.grad.numpy()


def images(n=3, seed=1, h=H, w=W):
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, C)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    p = _weights()
    return jax_model(p), torch_model(p)


# ---------------------------------------------------------------------------------------------
# Vanilla gradient


def test_gradient_linear_model_is_weight_column():
    r = np.random.default_rng(0)
    wl = r.normal(size=(H * W * C, K)).astype(np.float32)
    fn = lambda x: x.reshape(x.shape[0], -1) @ wl  # noqa: E731
    x = images(4, seed=3)
    targets = np.array([0, 4, 2, 2])
    g = A.vanilla_gradient(fn, x, targets)
    np.testing.assert_allclose(g, wl[:, targets].T.reshape(4, H, W, C), rtol=1e-6)
    # targets=None -> argmax of the logits; an int is the same class for every image
    pred = np.argmax(x.reshape(4, -1) @ wl, axis=1)
    np.testing.assert_allclose(A.vanilla_gradient(fn, x), wl[:, pred].T.reshape(4, H, W, C), rtol=1e-6)
    np.testing.assert_allclose(A.vanilla_gradient(fn, x, 3), np.broadcast_to(wl[:, 3].reshape(H, W, C), x.shape),
                               rtol=1e-6)


@pytest.mark.parametrize("score", ["logit", "prob"])
def test_gradient_matches_torch_float64(model, score):
    fn, tfn = model
    x = images(3, seed=5)
    targets = np.array([1, 0, 4])
    g = A.vanilla_gradient(fn, x, targets, score=score)
    ref = torch_grad(tfn, x, targets, score)
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_reduce_channels_modes_match_numpy():
    a = np.random.default_rng(2).normal(size=(2, 5, 4, 3)).astype(np.float32)
    refs = {"sum": a.sum(-1), "abs_sum": np.abs(a).sum(-1), "abs_max": np.abs(a).max(-1), "max": a.max(-1),
            "l2": np.sqrt((a ** 2).sum(-1))}
    for mode, ref in refs.items():
        np.testing.assert_allclose(A.reduce_channels(a, mode), ref, rtol=1e-6, err_msg=mode)
    with pytest.raises(ValueError, match="reduce mode"):
        A.reduce_channels(a, "mean")


def test_gradient_reduce_option(model):
    fn, _ = model
    x = images(2, seed=6)
    g = np.asarray(A.vanilla_gradient(fn, x, 1))
    np.testing.assert_allclose(A.vanilla_gradient(fn, x, 1, reduce="abs_max"), np.abs(g).max(-1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# SmoothGrad


def test_smoothgrad_matches_loop_over_the_documented_noise(model):
    fn, tfn = model
    x = images(2, seed=7)
    targets = np.array([2, 3])
    # An "rbg" key compiles much faster than threefry on CPU. rbg draws change under vmap, so the
    # reference draws the documented noise normal(fold_in(key, s)) vmapped over all samples, as
    # smoothgrad does when batch_size >= num_samples (the padded-chunk path is checked below).
    key, num_samples, noise_level = jax.random.key(11, impl="rbg"), 5, 0.1
    sg = A.smoothgrad(fn, x, targets, key=key, num_samples=num_samples, noise_level=noise_level, batch_size=8)
    sigma = noise_level * 2.0
    noise = jax.jit(jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), x.shape)))(
        jnp.arange(num_samples))
    ref = np.mean([torch_grad(tfn, x + sigma * np.asarray(noise[s]), targets) for s in range(num_samples)], axis=0)
    np.testing.assert_allclose(sg, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_smoothgrad_expectation_for_cubic_model():
    # f_c(x) = sum_i w_ci x_i^3 -> E[grad f(x + e)] = 3 w (x^2 + sigma^2) with sigma = level * range
    r = np.random.default_rng(1)
    wc = r.normal(size=(2, 2, 3, 2)).astype(np.float32)
    fn = lambda x: jnp.einsum("nhwc,hwck->nk", x ** 3, wc)  # noqa: E731
    x = r.uniform(-1, 1, (2, 2, 2, 3)).astype(np.float32)
    level = 0.15
    # batch_size 1000 does not divide 4096: the padded last chunk must not count
    sg = A.smoothgrad(fn, x, 1, key=jax.random.key(3, impl="rbg"), num_samples=4096, noise_level=level, batch_size=1000)
    exact = 3 * wc[..., 1] * (x ** 2 + (level * 2.0) ** 2)
    np.testing.assert_allclose(sg, exact, atol=0.06 * np.abs(wc[..., 1]).max())


# ---------------------------------------------------------------------------------------------
# Integrated Gradients


def test_ig_exact_for_quadratic_model_with_trapezoid():
    # f_c(x) = 0.5 x^T Q_c x: the gradient is linear along the path, so the trapezoid rule is exact:
    # IG = (x - b) * Q (x + b) / 2 for any number of steps.
    r = np.random.default_rng(4)
    d = 2 * 3 * C
    q = r.normal(size=(K, d, d)).astype(np.float32)
    q = q + q.transpose(0, 2, 1)
    fn = lambda x: 0.5 * jnp.einsum("ni,kij,nj->nk", x.reshape(x.shape[0], -1), q, x.reshape(x.shape[0], -1))  # noqa
    x = r.uniform(-1, 1, (3, 2, 3, C)).astype(np.float32)
    b = r.uniform(-1, 1, (3, 2, 3, C)).astype(np.float32)
    t = np.array([0, 3, 1])
    ig = A.integrated_gradients(fn, x, t, baseline=b, num_steps=3, rule="trapezoid")
    xf, bf = x.reshape(3, -1).astype(np.float64), b.reshape(3, -1).astype(np.float64)
    ref = (xf - bf) * np.einsum("nij,nj->ni", q[t].astype(np.float64), xf + bf) / 2
    np.testing.assert_allclose(np.asarray(ig).reshape(3, -1), ref, rtol=1e-4, atol=1e-4)
    gap = A.completeness_gap(fn, x, ig, t, baseline=b)
    np.testing.assert_allclose(gap, 0.0, atol=1e-3)


@pytest.mark.parametrize("rule", ["trapezoid", "right"])
def test_ig_matches_torch_float64_same_quadrature(model, rule):
    fn, tfn = model
    x = images(2, seed=8)
    b = np.full_like(x, 0.2)
    t = np.array([4, 1])
    ig = A.integrated_gradients(fn, x, t, baseline=b, num_steps=9, rule=rule, batch_size=4)
    alphas, weights = A.integration_points(9, rule)
    avg = sum(w * torch_grad(tfn, b + a * (x - b), t) for a, w in zip(alphas, weights))
    ref = (x - b) * avg
    np.testing.assert_allclose(ig, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_ig_completeness_for_smooth_model(model):
    fn, _ = model
    x = images(3, seed=9)
    logits = np.asarray(fn(jnp.asarray(x)))
    t = logits.argmax(1)
    diff = logits[np.arange(3), t] - np.asarray(fn(jnp.zeros_like(x)))[np.arange(3), t]
    gaps = {}
    for m in (16, 128):
        ig = A.integrated_gradients(fn, x, num_steps=m, batch_size=32)
        gap = np.asarray(A.completeness_gap(fn, x, ig))
        np.testing.assert_allclose(gap, np.asarray(ig, np.float64).reshape(3, -1).sum(1) - diff, atol=2e-6)
        gaps[m] = np.abs(gap)
    assert np.all(gaps[128] <= 1e-3 * np.maximum(np.abs(diff), 1e-2)), (gaps, diff)
    assert np.all(gaps[128] <= gaps[16] + 1e-6)
    # the right Riemann rule converges more slowly (first order)
    ig_r = A.integrated_gradients(fn, x, num_steps=16, rule="right", batch_size=32)
    assert np.abs(np.asarray(A.completeness_gap(fn, x, ig_r))).max() > gaps[16].max()


def test_integration_points_integrate_polynomials():
    for rule, degree_exact in (("trapezoid", 1), ("midpoint", 1), ("right", 0), ("left", 0)):
        a, w = A.integration_points(16, rule)
        assert abs(w.sum() - 1.0) < 1e-12
        assert abs(np.dot(w, a ** degree_exact) - 1.0 / (degree_exact + 1)) < 1e-12, rule
    with pytest.raises(ValueError, match="integration rule"):
        A.integration_points(8, "simpson")
    with pytest.raises(ValueError, match="num_steps"):
        A.integration_points(0)


# ---------------------------------------------------------------------------------------------
# Grad-CAM


def np_resize_bilinear(m, out_h, out_w):
    """Half-pixel-centre bilinear resize of [N, h, w] with edge clamping, by hand."""
    def axis_weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        mat = np.zeros((n_out, n_in))
        mat[np.arange(n_out), i0] += 1 - (src - i0)
        mat[np.arange(n_out), i1] += src - i0
        return mat
    ry, rx = axis_weights(m.shape[1], out_h), axis_weights(m.shape[2], out_w)
    return np.einsum("yh,nhw,xw->nyx", ry, m, rx)


def _split_model(seed=0):
    r = np.random.default_rng(seed)
    w1 = jnp.asarray(r.normal(0, 0.6, (3, 3, C, 4)), jnp.float32)
    w2 = jnp.asarray(r.normal(0, 0.6, (3, 3, 4, 5)), jnp.float32)
    wl = jnp.asarray(r.normal(0, 1, (5, K)), jnp.float32)

    def trunk(x):  # stride-2 conv: feature map at half resolution (odd sizes)
        return jnp.tanh(jax.lax.conv_general_dilated(x, w1, (2, 2), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))

    def head(a):  # non-linear head, so the gradient varies over the map
        h = jax.nn.softplus(jax.lax.conv_general_dilated(a, w2, (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.mean(h ** 2, axis=(1, 2)) @ wl

    def features_and_logits(x):
        a = trunk(x)
        return {"stage1": a, "pooled": jnp.mean(a, axis=(1, 2))}, head(a)

    return trunk, head, features_and_logits


def test_grad_cam_equals_numpy_hand_computation():
    trunk, head, _ = _split_model()
    x = images(3, seed=10, h=11, w=9)
    t = np.array([0, 2, 4])
    cam = A.grad_cam_split(trunk, head, x, t)
    a = np.asarray(trunk(jnp.asarray(x)), np.float64)
    g = np.asarray(jax.grad(lambda f: jnp.sum(head(f)[jnp.arange(3), t]))(jnp.asarray(a, jnp.float32)), np.float64)
    assert a.shape == (3, 6, 5, 4)
    low = np.maximum(np.einsum("nhwk,nk->nhw", a, g.mean(axis=(1, 2))), 0.0)
    ref = np_resize_bilinear(low, 11, 9)
    assert ref.max() > 0 and (low == 0).any()  # the ReLU is exercised
    np.testing.assert_allclose(cam, ref, rtol=1e-4, atol=1e-6 * ref.max())
    small = A.grad_cam_split(trunk, head, x, t, upsample=False)
    np.testing.assert_allclose(small, low, rtol=1e-4, atol=1e-6 * ref.max())
    raw = A.grad_cam_from_features(head, a.astype(np.float32), t, relu=False)
    np.testing.assert_allclose(raw, np.einsum("nhwk,nk->nhw", a, g.mean(axis=(1, 2))), rtol=1e-4, atol=1e-6)


def test_grad_cam_named_layer_equals_split_incl_jit():
    trunk, head, fl = _split_model(1)
    x = images(2, seed=11)
    t = np.array([3, 1])
    ref = A.grad_cam_split(trunk, head, x, t)
    np.testing.assert_allclose(A.grad_cam(fl, x, "stage1", t), ref, rtol=1e-5, atol=1e-7)
    # a jitted model (the map is followed into the nested jit) returning (logits, features), the
    # order of the project's ResNet
    swapped = jax.jit(lambda im: fl(im)[::-1])
    np.testing.assert_allclose(A.grad_cam(swapped, x, "stage1", t), ref, rtol=1e-5, atol=1e-7)


def test_grad_cam_on_project_resnet_matches_manual_split():
    from viscoin_jax.models.resnet import ResNet

    # abstract init + numpy fill: the eager PRNG init of a ResNet takes a minute of CPU compile time
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNet(18, num_classes=4, width=4, small_input=True,
                                                              rngs=nnx.Rngs(0))))
    r = np.random.default_rng(0)

    def fill(path, leaf):
        v = r.normal(0, 0.3, leaf.shape)
        is_var = any(getattr(k, "key", None) == "var" for k in path)
        return jnp.asarray(0.5 + np.abs(v) if is_var else v, leaf.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    x = images(2, seed=12, h=12, w=12)

    def head(a):  # stage 4 + pool + fc, as in ResNet.__call__
        for block in model.layer4:
            a = block(a, False)
        return model.fc(jnp.mean(a, axis=(1, 2)))

    trunk = lambda im: model(im)[1]["stage3"]  # noqa: E731
    ref = A.grad_cam_split(trunk, head, x, 1)
    cam = A.grad_cam(lambda im: model(im), x, "stage3", 1)
    assert float(jnp.max(ref)) > 0
    np.testing.assert_allclose(cam, ref, rtol=1e-4, atol=1e-6 * float(jnp.max(ref)))


def test_grad_cam_errors():
    trunk, head, fl = _split_model()
    x = images(2)
    with pytest.raises(ValueError, match="unknown layer 'stage9'.*stage1"):
        A.grad_cam(fl, x, "stage9")
    with pytest.raises(ValueError, match="must be \\[N, h, w, K\\]"):
        A.grad_cam(fl, x, "pooled")
    with pytest.raises(ValueError, match="pair"):
        A.grad_cam(lambda im: head(trunk(im)), x, "stage1")
    with pytest.raises(ValueError, match="targets must be in"):
        A.grad_cam(fl, x, "stage1", K)

    def in_scan(im):  # feature map and logits both computed inside one scan: cannot be probed
        def body(c, _):
            a = trunk(im)
            return c, (a, head(a))
        _, (a, logits) = jax.lax.scan(body, 0, None, length=1)
        return {"f": a[0]}, logits[0]
    with pytest.raises(ValueError, match="grad_cam_split"):
        A.grad_cam(in_scan, x, "f")


# ---------------------------------------------------------------------------------------------
# Occlusion


def occlusion_loop(fn, x, t, patch, stride, fill, score):
    n, h, w, _ = x.shape

    def s(im):
        logits = np.asarray(fn(jnp.asarray(im)), np.float64)
        if score == "prob":
            e = np.exp(logits - logits.max(1, keepdims=True))
            logits = e / e.sum(1, keepdims=True)
        return logits[np.arange(n), t]

    base = s(x)
    total, count = np.zeros((n, h, w)), np.zeros((h, w))
    rows = list(range(0, h - patch[0] + 1, stride[0]))
    cols = list(range(0, w - patch[1] + 1, stride[1]))
    rows += [h - patch[0]] if rows[-1] != h - patch[0] else []
    cols += [w - patch[1]] if cols[-1] != w - patch[1] else []
    for r in rows:
        for c in cols:
            occ = x.copy()
            occ[:, r:r + patch[0], c:c + patch[1], :] = np.broadcast_to(fill, x.shape)[:, r:r + patch[0],
                                                                                      c:c + patch[1], :]
            total[:, r:r + patch[0], c:c + patch[1]] += (base - s(occ))[:, None, None]
            count[r:r + patch[0], c:c + patch[1]] += 1
    assert count.min() >= 1
    return total / count


@pytest.mark.parametrize("score,fill", [("prob", 0.25), ("logit", "array")])
def test_occlusion_equals_python_loop(model, score, fill):
    fn, _ = model
    x = images(2, seed=13)
    if fill == "array":
        fill = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    t = np.array([3, 0])
    occ = A.occlusion(fn, x, t, patch_size=(3, 4), stride=(2, 3), fill_value=fill, score=score, batch_size=5)
    ref = occlusion_loop(fn, x, t, (3, 4), (2, 3), fill, score)
    np.testing.assert_allclose(occ, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    assert occ.shape == (2, H, W)


def test_occlusion_starts_cover_the_image():
    assert A.occlusion_starts(7, 3, 2) == [0, 2, 4]
    assert A.occlusion_starts(9, 2, 3) == [0, 3, 6, 7]
    assert A.occlusion_starts(5, 5, 1) == [0]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise(model):
    fn, _ = model
    x = images(2)
    with pytest.raises(ValueError, match="NHWC"):
        A.vanilla_gradient(fn, x[0])
    with pytest.raises(ValueError, match="floating"):
        A.vanilla_gradient(fn, (x * 100).astype(np.int32))
    with pytest.raises(ValueError, match="targets must be in"):
        A.vanilla_gradient(fn, x, np.array([0, K]))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        A.vanilla_gradient(fn, x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        A.vanilla_gradient(fn, x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown score"):
        A.vanilla_gradient(fn, x, score="margin")
    with pytest.raises(ValueError, match="larger than the images"):
        A.occlusion(fn, x, patch_size=8)
    with pytest.raises(ValueError, match="must not exceed patch_size"):
        A.occlusion(fn, x, patch_size=2, stride=3)
    with pytest.raises(ValueError, match="baseline"):
        A.integrated_gradients(fn, x, baseline=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="noise_level"):
        A.smoothgrad(fn, x, noise_level=-0.1)
    with pytest.raises(ValueError, match="classifier_fn must return logits"):
        A.vanilla_gradient(lambda im: im.sum(), x, 0)


def test_normalize_maps():
    m = np.array([[[1.0, 3.0], [2.0, 5.0]], [[-4.0, 2.0], [0.0, 1.0]], [[7.0, 7.0], [7.0, 7.0]]])
    np.testing.assert_allclose(A.normalize_maps(m)[0], (m[0] - 1) / 4)
    np.testing.assert_allclose(A.normalize_maps(m, absolute=True)[1], np.abs(m[1]) / 4)
    np.testing.assert_allclose(A.normalize_maps(m)[2], 0.0)


def test_attribution_inside_user_jit_with_traced_targets(model):
    fn, _ = model
    x = images(2, seed=14)
    f = jax.jit(lambda im, t: A.integrated_gradients(fn, im, t, num_steps=4))
    np.testing.assert_allclose(f(x, jnp.array([1, 2])), A.integrated_gradients(fn, x, np.array([1, 2]), num_steps=4),
                               rtol=1e-5, atol=1e-7)
    g = functools.partial(A.vanilla_gradient, reduce="sum")
    assert g(fn, x).shape == (2, H, W)
