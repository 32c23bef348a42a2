"""Pixel attribution maps for an image classifier: gradient, SmoothGrad, Integrated Gradients,
Grad-CAM and occlusion sensitivity.

Every method is a plain function of a classifier callable, so it works with any model of the
project (or a notebook lambda):

    classifier_fn(images [N, H, W, C] in [-1, 1]) -> logits [N, num_classes]

`targets` is the class explained per image: None (the classifier's argmax on the clean image), an
int (the same class for every image) or an int array [N]. `score` picks the scalar explained:
"logit" (default for the gradient methods, as in the papers), "prob" (softmax) or "log_prob".

The gradient methods differentiate sum_n score_n over the batch, which gives per-image gradients
only if images do not interact inside the classifier: call batch-norm models in inference mode.
Repeated evaluations (SmoothGrad samples, integration points, occluding patches) run in one
compiled `lax.scan` over chunks of `batch_size` evaluations, each chunk vectorised with `vmap`, so
memory grows with batch_size * N images, not with the number of evaluations.

Gradient methods return [N, H, W, C] like the input; `reduce` (or `reduce_channels`) turns them into
[N, H, W] maps. Grad-CAM and occlusion return [N, H, W] maps.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ..checks import as_key, broadcast_to_images, check_choice, check_images, check_positive_int, check_targets
from ..metrics.maps import REDUCTIONS, normalize_maps, reduce_channels
from .. import scores
from ..scores import SCORES, class_score, prepare_targets, resolve_targets

ClassifierFn = Callable[[jax.Array], jax.Array]

IG_RULES = ("trapezoid", "right", "left", "midpoint")


# ----------------------------------------------------------------------------------------------
# Shared pieces (the input checks live in viscoin_jax.checks, the scores in viscoin_jax.scores)


def _score_grad(classifier_fn, x, targets, score, has_aux=False):
    """(d score / d x, logits, targets[, aux]) with one forward pass (targets None -> argmax)."""
    if has_aux:
        logits, vjp_fn, aux = jax.vjp(classifier_fn, x, has_aux=True)
    else:
        logits, vjp_fn = jax.vjp(classifier_fn, x)
    t = resolve_targets(jax.lax.stop_gradient(logits), targets)
    cot = jax.grad(lambda l: jnp.sum(class_score(l, t, score)))(logits)
    (g,) = vjp_fn(cot)
    return (g, logits, t, aux) if has_aux else (g, logits, t)


def _weighted_sum(fn: Callable, xs: jax.Array, weights: jax.Array, batch_size: int):
    """sum_s weights[s] * fn(xs[s]), `batch_size` evaluations vectorised per step of a lax.scan."""
    s = xs.shape[0]
    b = min(batch_size, s)
    num_chunks = -(-s // b)
    pad = num_chunks * b - s
    if pad:
        xs = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, axis=0)], axis=0)
        weights = jnp.concatenate([weights, jnp.zeros((pad,), weights.dtype)])
    xs = xs.reshape((num_chunks, b) + xs.shape[1:])
    weights = weights.reshape(num_chunks, b)
    out_struct = jax.eval_shape(fn, xs[0, 0])

    def body(acc, chunk):
        x, w = chunk
        out = jax.vmap(fn)(x)
        return acc + jnp.sum(w.reshape((b,) + (1,) * (out.ndim - 1)).astype(out.dtype) * out, axis=0), None

    acc, _ = jax.lax.scan(body, jnp.zeros(out_struct.shape, out_struct.dtype), (xs, weights))
    return acc


def _check_reduce(reduce):
    if reduce is not None:
        check_choice(reduce, REDUCTIONS, "reduce mode")


# ----------------------------------------------------------------------------------------------
# Gradient methods


def vanilla_gradient(classifier_fn: ClassifierFn, images, targets=None, *, score: str = "logit",
                     reduce: str | None = None) -> jax.Array:
    """Gradient of the target score with respect to the input pixels (Simonyan et al. 2014).

    Returns [N, H, W, C], or [N, H, W] with `reduce` (e.g. "abs_max" for the classic saliency map).
    """
    images, targets = prepare_targets(classifier_fn, images, targets)
    check_choice(score, SCORES, "score")
    _check_reduce(reduce)
    return _vanilla_gradient(classifier_fn, images, targets, score, reduce)


@functools.partial(jax.jit, static_argnames=("classifier_fn", "score", "reduce"))
def _vanilla_gradient(classifier_fn, images, targets, score, reduce):
    g, _, _ = _score_grad(classifier_fn, images, targets, score)
    return reduce_channels(g, reduce)


def smoothgrad(classifier_fn: ClassifierFn, images, targets=None, *, key=0, num_samples: int = 32,
               noise_level: float = 0.15, value_range: tuple[float, float] = (-1.0, 1.0),
               score: str = "logit", reduce: str | None = None, batch_size: int = 8) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the input.

    noise ~ N(0, sigma^2) with sigma = noise_level * (value_range[1] - value_range[0]), i.e. a
    fraction of the nominal input range (the paper uses 10-20 %). Sample s uses the noise
    sigma * normal(fold_in(key, s), images.shape), so results are reproducible from `key` and, with
    the default threefry keys, do not depend on batch_size ("rbg" keys change values under vmap).
    The target class is fixed from the clean images (argmax if None).
    """
    images, targets = prepare_targets(classifier_fn, images, targets)
    check_choice(score, SCORES, "score")
    _check_reduce(reduce)
    num_samples = check_positive_int(num_samples, "num_samples")
    batch_size = check_positive_int(batch_size, "batch_size")
    if not np.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite fraction >= 0, got {noise_level}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    sigma = float(noise_level) * float(hi - lo)
    return _smoothgrad(classifier_fn, images, targets, as_key(key), num_samples, sigma, score, reduce,
                       batch_size)


@functools.partial(jax.jit, static_argnames=("classifier_fn", "num_samples", "score", "reduce", "batch_size"))
def _smoothgrad(classifier_fn, images, targets, key, num_samples, sigma, score, reduce, batch_size):
    targets = resolve_targets(classifier_fn(images), targets)

    def grad_at(s):
        noise = sigma * jax.random.normal(jax.random.fold_in(key, s), images.shape, images.dtype)
        return _score_grad(classifier_fn, images + noise, targets, score)[0]

    samples = jnp.arange(num_samples, dtype=jnp.int32)
    weights = jnp.full((num_samples,), 1.0 / num_samples, images.dtype)
    return reduce_channels(_weighted_sum(grad_at, samples, weights, batch_size), reduce)


def integration_points(num_steps: int, rule: str = "trapezoid") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of a quadrature of [0, 1] with num_steps intervals: sum w f(a) ~ int f.

    "trapezoid": num_steps + 1 points k/m with end weights 1/(2m) (second order; exact when the
    gradient is linear along the path), "right"/"left": the m right/left end points, "midpoint":
    the m interval centres (second order).
    """
    m = check_positive_int(num_steps, "num_steps")
    check_choice(rule, IG_RULES, "integration rule")
    if rule == "trapezoid":
        alphas = np.arange(m + 1) / m
        weights = np.full(m + 1, 1.0 / m)
        weights[[0, -1]] = 0.5 / m
    else:
        offset = {"right": 1.0, "left": 0.0, "midpoint": 0.5}[rule]
        alphas = (np.arange(m) + offset) / m
        weights = np.full(m, 1.0 / m)
    return alphas, weights


def integrated_gradients(classifier_fn: ClassifierFn, images, targets=None, *, baseline=0.0,
                         num_steps: int = 64, rule: str = "trapezoid", score: str = "logit",
                         reduce: str | None = None, batch_size: int = 8) -> jax.Array:
    """Integrated Gradients (Sundararajan et al. 2017) along the straight path baseline -> image.

    attr = (x - x') * int_0^1 grad F(x' + a (x - x')) da, computed with `integration_points`.
    Completeness: sum(attr) = F(x) - F(x') up to the quadrature error (see `completeness_gap`).
    The default baseline 0 is mid-grey in [-1, 1]; `baseline` may be a scalar or an array
    broadcastable to the images (e.g. a blurred copy). The target class is fixed from the images.
    """
    images, targets = prepare_targets(classifier_fn, images, targets)
    check_choice(score, SCORES, "score")
    _check_reduce(reduce)
    batch_size = check_positive_int(batch_size, "batch_size")
    alphas, weights = integration_points(num_steps, rule)
    baseline = broadcast_to_images(baseline, images, "baseline")
    return _integrated_gradients(classifier_fn, images, targets, baseline, jnp.asarray(alphas, images.dtype),
                                 jnp.asarray(weights, images.dtype), score, reduce, batch_size)


@functools.partial(jax.jit, static_argnames=("classifier_fn", "score", "reduce", "batch_size"))
def _integrated_gradients(classifier_fn, images, targets, baseline, alphas, weights, score, reduce, batch_size):
    targets = resolve_targets(classifier_fn(images), targets)
    delta = images - baseline

    def grad_at(a):
        return _score_grad(classifier_fn, baseline + a * delta, targets, score)[0]

    avg_grad = _weighted_sum(grad_at, alphas, weights, batch_size)
    return reduce_channels(delta * avg_grad, reduce)


def completeness_gap(classifier_fn: ClassifierFn, images, attributions, targets=None, *, baseline=0.0,
                     score: str = "logit") -> jax.Array:
    """[N] sum(attributions) - (F(x) - F(baseline)): how far IG is from completeness (0 = exact)."""
    images, targets = prepare_targets(classifier_fn, images, targets)
    baseline = broadcast_to_images(baseline, images, "baseline")
    attributions = jnp.asarray(attributions)
    if attributions.shape[0] != images.shape[0]:
        raise ValueError(f"attributions batch {attributions.shape[0]} != images batch {images.shape[0]}")
    logits = classifier_fn(images)
    t = resolve_targets(logits, targets)
    diff = class_score(logits, t, score) - class_score(classifier_fn(baseline), t, score)
    return jnp.sum(attributions.reshape(attributions.shape[0], -1), axis=1) - diff


# ----------------------------------------------------------------------------------------------
# Grad-CAM


def grad_cam_from_features(head_fn: Callable[[jax.Array], jax.Array], feature_map, targets=None, *,
                           output_size: tuple[int, int] | None = None, score: str = "logit",
                           relu: bool = True) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017) from a feature map A [N, h, w, K] and the head on top of it.

    weights_k = mean_{ij} d score / d A_ijk; cam = ReLU(sum_k weights_k A_k) [N, h, w], resized
    bilinearly (half-pixel centres, edge clamped) to output_size (the input's H, W) when given.
    """
    a = jnp.asarray(feature_map)
    if a.ndim != 4 or not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"feature_map must be a floating [N, h, w, K] array, got {a.dtype} {a.shape}")
    check_choice(score, SCORES, "score")
    num_classes = scores.num_classes(head_fn, a) if targets is not None else None
    targets = check_targets(targets, a.shape[0], num_classes)
    output_size = _check_output_size(output_size)
    return _grad_cam_from_features(head_fn, a, targets, output_size, score, relu)


def _check_output_size(output_size):
    if output_size is None:
        return None
    if len(output_size) != 2:
        raise ValueError(f"output_size must be (H, W), got {output_size}")
    return tuple(check_positive_int(s, "output_size") for s in output_size)


def _cam(a, g, output_size, relu):
    weights = jnp.mean(g, axis=(1, 2))  # [N, K]
    cam = jnp.einsum("nhwk,nk->nhw", a, weights, precision=jax.lax.Precision.HIGHEST)
    if relu:
        cam = jax.nn.relu(cam)
    if output_size is not None and tuple(output_size) != cam.shape[1:]:
        cam = jax.image.resize(cam, (cam.shape[0],) + tuple(output_size), method="bilinear")
    return cam


@functools.partial(jax.jit, static_argnames=("head_fn", "output_size", "score", "relu"))
def _grad_cam_from_features(head_fn, a, targets, output_size, score, relu):
    g, _, _ = _score_grad(head_fn, a, targets, score)
    return _cam(a, g, output_size, relu)


def grad_cam_split(trunk_fn: Callable[[jax.Array], jax.Array], head_fn: Callable[[jax.Array], jax.Array],
                   images, targets=None, *, score: str = "logit", relu: bool = True,
                   upsample: bool = True) -> jax.Array:
    """Grad-CAM for a classifier written as head_fn(trunk_fn(images)); maps [N, H, W] (or [N, h, w]
    at the feature resolution with upsample=False)."""
    images = check_images(images)
    check_choice(score, SCORES, "score")
    a = jax.eval_shape(trunk_fn, jax.ShapeDtypeStruct(images.shape, images.dtype))
    if len(getattr(a, "shape", ())) != 4 or a.shape[0] != images.shape[0]:
        raise ValueError(f"trunk_fn must return a feature map [N, h, w, K], got {getattr(a, 'shape', type(a))}")
    num_classes = scores.num_classes(head_fn, a) if targets is not None else None
    targets = check_targets(targets, images.shape[0], num_classes)
    return _grad_cam_split(trunk_fn, head_fn, images, targets, score, relu, upsample)


@functools.partial(jax.jit, static_argnames=("trunk_fn", "head_fn", "score", "relu", "upsample"))
def _grad_cam_split(trunk_fn, head_fn, images, targets, score, relu, upsample):
    a = trunk_fn(images)
    g, _, _ = _score_grad(head_fn, a, targets, score)
    return _cam(a, g, images.shape[1:3] if upsample else None, relu)


def grad_cam(features_and_logits_fn: Callable, images, layer: str, targets=None, *, score: str = "logit",
             relu: bool = True, upsample: bool = True) -> jax.Array:
    """Grad-CAM on the feature map named `layer` of a model that returns (features dict, logits).

    `features_and_logits_fn(images)` returns a pair holding a dict of named feature maps
    [N, h, w, K] and the logits [N, C], in either order (so `lambda x: resnet(x)` works as is).
    The gradient of the logits with respect to the named map is taken by re-evaluating the traced
    function with a zero probe added to that map (a small jaxpr interpreter; it follows the map
    into nested jit / remat calls). A map produced inside a scan, loop or cond that also computes
    later layers cannot be probed: use `grad_cam_split` for such models.
    """
    images = check_images(images)
    check_choice(score, SCORES, "score")
    paths = _output_paths(features_and_logits_fn, images, layer)
    num_classes = paths[2] if targets is not None else None
    targets = check_targets(targets, images.shape[0], num_classes)
    return _grad_cam_named(features_and_logits_fn, images, layer, targets, score, relu, upsample)


def _output_paths(fn, images, layer):
    """(flat index of features[layer], flat index of the logits, num_classes), checking the output."""
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(images.shape, images.dtype))
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError("features_and_logits_fn must return a pair (dict of feature maps, logits)")
    dict_pos = [i for i in (0, 1) if isinstance(out[i], dict)]
    if len(dict_pos) != 1 or not hasattr(out[1 - dict_pos[0]], "shape"):
        raise ValueError("features_and_logits_fn must return one dict of feature maps and one logits array, "
                         f"got ({type(out[0]).__name__}, {type(out[1]).__name__})")
    fi = dict_pos[0]
    feats, logits = out[fi], out[1 - fi]
    if layer not in feats:
        raise ValueError(f"unknown layer {layer!r}; the model returns feature maps {sorted(map(str, feats))}")
    fmap = feats[layer]
    if not hasattr(fmap, "shape") or len(fmap.shape) != 4 or fmap.shape[0] != images.shape[0]:
        raise ValueError(f"feature map {layer!r} must be [N, h, w, K], got {getattr(fmap, 'shape', type(fmap))}")
    if len(logits.shape) != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"logits must be [N, num_classes], got {logits.shape}")
    leaves = jax.tree_util.tree_flatten_with_path(out)[0]
    keys = [path for path, _ in leaves]
    feat_idx = keys.index((jax.tree_util.SequenceKey(fi), jax.tree_util.DictKey(layer)))
    logit_idx = keys.index((jax.tree_util.SequenceKey(1 - fi),))
    return feat_idx, logit_idx, int(logits.shape[1])


@functools.partial(jax.jit, static_argnames=("fn", "layer", "score", "relu", "upsample"))
def _grad_cam_named(fn, images, layer, targets, score, relu, upsample):
    feat_idx, logit_idx, _ = _output_paths(fn, images, layer)
    closed = jax.make_jaxpr(fn)(images)
    target_var = closed.jaxpr.outvars[feat_idx]
    if isinstance(target_var, jex_core.Literal):
        raise ValueError(f"feature map {layer!r} is a constant of the model, not a function of the images")

    logits_depend = []

    def probed(probe):
        outs, deps = _eval_with_probe(closed.jaxpr, closed.consts, [images], target_var, probe)
        logits_depend.append(deps[logit_idx])
        return outs[logit_idx], outs[feat_idx]

    probe = jnp.zeros(target_var.aval.shape, target_var.aval.dtype)
    g, _, _, a = _score_grad(probed, probe, targets, score, has_aux=True)
    if not all(logits_depend):
        raise ValueError(f"the logits are not computed from the returned feature map {layer!r} (it is a copy "
                         "made apart from the path to the logits, e.g. inside a scan or loop); "
                         "use grad_cam_split(trunk_fn, head_fn, ...)")
    return _cam(a, g, images.shape[1:3] if upsample else None, relu)


_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2",
                    "custom_jvp_call", "custom_vjp_call")


def _sub_jaxpr(eqn):
    """(jaxpr, consts) of a call-like equation whose inputs map one to one onto its jaxpr, else None."""
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, jex_core.ClosedJaxpr):
        jaxpr, consts = sub.jaxpr, list(sub.consts)
    elif isinstance(sub, jex_core.Jaxpr) and not sub.constvars:
        jaxpr, consts = sub, []
    else:
        return None
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr, consts


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # older jax: (subfuns, params)
        subfuns, params = params
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
    with ctx:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _eval_with_probe(jaxpr, consts, args, target, probe):
    """Evaluates jaxpr with `probe` added to the variable `target`, so everything downstream sees it.

    Returns (outputs, depends): depends[i] tells whether output i is downstream of the probe.
    """
    env, tainted = {}, set()

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    def write(v, val, dep):
        if not isinstance(v, jex_core.DropVar):
            env[v] = val
            if dep:
                tainted.add(v)

    def depends(v):
        return not isinstance(v, jex_core.Literal) and v in tainted

    for v, c in zip(jaxpr.constvars, consts):
        write(v, c, False)
    for v, a in zip(jaxpr.invars, args):
        write(v, a, False)
    if target in env:
        write(target, env[target] + probe, True)
        target = None
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        dep_in = any(depends(v) for v in eqn.invars)
        if target is not None and any(v is target for v in eqn.outvars):
            i = next(k for k, v in enumerate(eqn.outvars) if v is target)
            sub = _sub_jaxpr(eqn)
            if sub is not None and len(eqn.outvars) > 1:
                inner_target = sub[0].outvars[i]
                if isinstance(inner_target, jex_core.Literal):
                    raise ValueError("the probed feature map is a constant inside the model")
                outs, deps = _eval_with_probe(sub[0], sub[1], invals, inner_target, probe)
            elif len(eqn.outvars) == 1 or not jex_core.jaxprs_in_params(eqn.params):
                outs = list(_bind(eqn, invals))
                outs[i] = outs[i] + probe
                deps = [k == i for k in range(len(outs))]
            else:
                raise ValueError(f"the feature map is produced inside a '{eqn.primitive.name}' together with "
                                 "other outputs and cannot be probed; use grad_cam_split(trunk_fn, head_fn, ...)")
            target = None
        else:
            outs = _bind(eqn, invals)
            deps = [dep_in] * len(outs)
        for v, val, dep in zip(eqn.outvars, outs, deps):
            write(v, val, dep or dep_in)
    return [read(v) for v in jaxpr.outvars], [depends(v) for v in jaxpr.outvars]


# ----------------------------------------------------------------------------------------------
# Occlusion


def _pair(value, name):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    return tuple(check_positive_int(v, name) for v in value)


def occlusion_starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch start offsets 0, stride, 2 stride, ... plus size - patch if the last one stops short,
    so that, with stride <= patch, every pixel is covered by at least one patch."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion(classifier_fn: ClassifierFn, images, targets=None, *, patch_size=8, stride=4,
              fill_value=0.0, score: str = "prob", batch_size: int = 16) -> jax.Array:
    """Occlusion sensitivity (Zeiler & Fergus 2014): [N, H, W] mean drop of the target score when a
    patch covering the pixel is replaced by `fill_value`.

    drop = score(x) - score(x with the patch filled); each pixel's value is the mean drop over the
    patches that cover it (positions from `occlusion_starts`; stride <= patch_size, so every pixel
    is covered).
    fill_value: scalar (0 = mid-grey) or an array broadcastable to the images (e.g. a blurred copy).
    """
    images, targets = prepare_targets(classifier_fn, images, targets)
    check_choice(score, SCORES, "score")
    batch_size = check_positive_int(batch_size, "batch_size")
    ph, pw = _pair(patch_size, "patch_size")
    sh, sw = _pair(stride, "stride")
    h, w = images.shape[1:3]
    if ph > h or pw > w:
        raise ValueError(f"patch_size {(ph, pw)} is larger than the images {(h, w)}")
    if sh > ph or sw > pw:
        raise ValueError(f"stride {(sh, sw)} must not exceed patch_size {(ph, pw)}: pixels would be left unscored")
    rows, cols = occlusion_starts(h, ph, sh), occlusion_starts(w, pw, sw)
    positions = np.array([(r, c) for r in rows for c in cols], np.int32)
    counts = np.zeros((h, w))
    for r, c in positions:
        counts[r:r + ph, c:c + pw] += 1
    fill = broadcast_to_images(fill_value, images, "fill_value")
    total = _occlusion_sum(classifier_fn, images, targets, fill, jnp.asarray(positions), (ph, pw), score,
                           batch_size)
    return total / jnp.asarray(counts, total.dtype)


@functools.partial(jax.jit, static_argnames=("classifier_fn", "patch", "score", "batch_size"))
def _occlusion_sum(classifier_fn, images, targets, fill, positions, patch, score, batch_size):
    logits = classifier_fn(images)
    targets = resolve_targets(logits, targets)
    base = class_score(logits, targets, score)
    h, w = images.shape[1:3]
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]

    def drop_at(pos):
        mask = ((rows >= pos[0]) & (rows < pos[0] + patch[0]) & (cols >= pos[1]) & (cols < pos[1] + patch[1]))
        occluded = jnp.where(mask[None, :, :, None], fill, images)
        drop = base - class_score(classifier_fn(occluded), targets, score)
        return drop[:, None, None] * mask[None].astype(images.dtype)

    weights = jnp.ones((positions.shape[0],), images.dtype)
    return _weighted_sum(drop_at, positions, weights, batch_size)


# ----------------------------------------------------------------------------------------------
# The report's [N, H, W] maps: one signature for every attribution method, so the method registry
# (explain.methods) names each by its function and passes the settings it holds.


def gradient_map(classifier_fn, feats_fn, images, targets, *, key=0) -> jax.Array:
    """Vanilla gradient, max |.| over channels."""
    return vanilla_gradient(classifier_fn, images, targets, reduce="abs_max")


def smoothgrad_map(classifier_fn, feats_fn, images, targets, *, key=0, num_samples: int,
                   noise_level: float) -> jax.Array:
    """SmoothGrad over `num_samples` noisy copies, max |.| over channels."""
    return smoothgrad(classifier_fn, images, targets, key=key, num_samples=num_samples,
                      noise_level=noise_level, reduce="abs_max")


def integrated_gradients_map(classifier_fn, feats_fn, images, targets, *, key=0, num_steps: int) -> jax.Array:
    """Integrated Gradients from the zero image, summed over channels (signed)."""
    return reduce_channels(integrated_gradients(classifier_fn, images, targets, num_steps=num_steps), "sum")


def grad_cam_map(classifier_fn, feats_fn, images, targets, *, key=0, layer: str) -> jax.Array:
    """Grad-CAM on the feature map named `layer` of `feats_fn` (features dict, logits)."""
    return grad_cam(feats_fn, images, layer, targets)


def occlusion_map(classifier_fn, feats_fn, images, targets, *, key=0, patches_per_side: int) -> jax.Array:
    """Occlusion with square patches of 1/`patches_per_side` of the side, moved by half a patch."""
    patches_per_side = check_positive_int(patches_per_side, "patches_per_side")
    size = images.shape[1]
    return occlusion(classifier_fn, images, targets, patch_size=max(size // patches_per_side, 2),
                     stride=max(size // (2 * patches_per_side), 1))


__all__ = [
    "SCORES", "REDUCTIONS", "IG_RULES", "check_images", "check_targets",
    "class_score", "reduce_channels", "vanilla_gradient", "smoothgrad", "integration_points",
    "integrated_gradients", "completeness_gap", "grad_cam", "grad_cam_split", "grad_cam_from_features",
    "occlusion", "occlusion_starts", "normalize_maps", "gradient_map", "smoothgrad_map",
    "integrated_gradients_map", "grad_cam_map", "occlusion_map",
]
