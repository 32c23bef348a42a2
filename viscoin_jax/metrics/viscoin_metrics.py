"""VisCoIN's concept metrics (Parekh et al. 2025, sec. 4): faithfulness and consistency.

Faithfulness FF_x = g(x~)_c - g(x_rem)_c: x~ is the reconstruction from the concepts of x, x_rem
the reconstruction after zeroing every concept with relevance r_k >= tau (for g's predicted class c),
and g is the whole VisCoIN pipeline (concept extractor + interpretable head) re-run on the decoded
image. A faithful concept set loses the class when its relevant concepts are removed. Reported as
the median over the test set for tau in {0.1, 0.2, 0.4}. The boundary is inclusive so that tau = 1
still removes the top concept (its relevance is exactly 1); the paper's "r_k > tau" differs from
this only on a set of measure zero for tau < 1.

Consistency CC_k: does concept k change the image in the same way everywhere? For each image
where concept k is active (maxpool(phi_k) > 0), x+ decodes phi with phi_k scaled by lambda and x-
with phi_k = 0; a linear SVM on the classifier's features (stage 2, spatially pooled) separates x+
from x- on training pairs; CC_k is its accuracy on test pairs. Reported as mean +- std over
concepts. Where phi_k = 0, x+ and x- are the same image with opposite labels: such a pair means
nothing (any rule gets exactly one of the two right), and counting it pulls CC toward 0.5 in
proportion to how rarely the concept fires (the official code's definition has the same caveat).

The SVM is a linear soft-margin SVM (hinge loss + L2) solved by dual coordinate descent
(Hsieh et al. 2008), batched over concepts with `vmap`.

Callables are static arguments of the compiled functions (compilation is cached on their identity;
they must be pure, e.g. frozen models in eval mode), as in `latent_direction`.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import check_phi, check_rgb_images
from ..models.concepts import concept_relevance, decode_concepts, scale_concepts
from ..scores import class_score

ConceptsFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
HeadFn = Callable[[jax.Array], jax.Array]
TranslatorFn = Callable[[jax.Array, jax.Array], jax.Array]
SynthesisFn = Callable[[jax.Array], jax.Array]
FeatureFn = Callable[[jax.Array], jax.Array]

DEFAULT_TAUS = (0.1, 0.2, 0.4)


def _batch_images(batch) -> jax.Array:
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError("a batch dict must have an 'image' entry")
        batch = batch["image"]
    return check_rgb_images(batch)


# --------------------------------------------------------------------------------------------------
# Faithfulness


def faithfulness_batch(
    images,
    *,
    concepts_fn: ConceptsFn,
    head_fn: HeadFn,
    head_weight,
    translator_fn: TranslatorFn,
    synthesis_fn: SynthesisFn,
    taus=DEFAULT_TAUS,
    score: str = "prob",
) -> jax.Array:
    """FF [T, N] for one batch and every tau (pure and jit-able).

    c is g's prediction on x; relevances are for c; concepts with r_k >= tau are removed. `score` picks what g(.)_c is: "prob" (softmax
    probability, default), "logit" or "log_prob".
    """
    images = check_rgb_images(images)
    taus = jnp.asarray(taus, jnp.float32).reshape(-1)

    def g(x):
        return head_fn(concepts_fn(x)[0])

    phi, phi_prime = concepts_fn(images)
    phi = check_phi(phi, "concepts_fn output phi")
    classes = jnp.argmax(head_fn(phi), axis=-1).astype(jnp.int32)
    relevance = concept_relevance(phi, head_weight, classes)
    reconstruction = decode_concepts(translator_fn, synthesis_fn, phi, phi_prime)
    base = class_score(g(reconstruction), classes, score)

    def removed(tau):
        keep = (relevance < tau).astype(phi.dtype)  # removed: r >= tau
        x_rem = decode_concepts(translator_fn, synthesis_fn, phi * keep[:, None, None, :], phi_prime)
        return base - class_score(g(x_rem), classes, score)

    return jax.lax.map(removed, taus)


_faithfulness_step = jax.jit(
    faithfulness_batch, static_argnames=("concepts_fn", "head_fn", "translator_fn", "synthesis_fn", "score")
)


class Faithfulness(NamedTuple):
    taus: np.ndarray  # [T]
    per_image: np.ndarray  # [T, N] FF of every test image
    median: np.ndarray  # [T] the reported number


def faithfulness(
    batches: Iterable,
    *,
    concepts_fn: ConceptsFn,
    head_fn: HeadFn,
    head_weight,
    translator_fn: TranslatorFn,
    synthesis_fn: SynthesisFn,
    taus=DEFAULT_TAUS,
    score: str = "prob",
) -> Faithfulness:
    """Median FF over a test set given as batches (image arrays or dicts with "image")."""
    taus = np.asarray(taus, np.float32).reshape(-1)
    if taus.size == 0:
        raise ValueError("taus must not be empty")
    head_weight = jnp.asarray(head_weight)
    kwargs = dict(concepts_fn=concepts_fn, head_fn=head_fn, head_weight=head_weight, translator_fn=translator_fn,
                  synthesis_fn=synthesis_fn, taus=jnp.asarray(taus), score=score)
    parts = [np.asarray(_faithfulness_step(_batch_images(b), **kwargs)) for b in batches]
    if not parts:
        raise ValueError("batches is empty")
    per_image = np.concatenate(parts, axis=1)
    return Faithfulness(taus, per_image, np.median(per_image, axis=1))


# --------------------------------------------------------------------------------------------------
# Linear SVM (dual coordinate descent)


class LinearSVM(NamedTuple):
    weight: jax.Array  # [D]
    bias: jax.Array  # []
    mean: jax.Array  # [D] feature standardisation applied before the weight (0 if off)
    scale: jax.Array  # [D] (1 if off)
    epochs: jax.Array  # passes over the data used
    converged: jax.Array  # bool: projected-gradient gap below tol


def svm_decision(svm: LinearSVM, x) -> jax.Array:
    """Signed decision values [..., M] (> 0 means label +1)."""
    return ((jnp.asarray(x) - svm.mean) / svm.scale) @ svm.weight + svm.bias


def _stride(m: int) -> int:
    """A step coprime to m near m / golden ratio: j -> (j * stride + offset) % m visits every sample once
    in a well-mixed order (a cheap stand-in for a random permutation)."""
    for delta in range(m):
        for s in (round(m * 0.618) + delta, round(m * 0.618) - delta):
            if 1 <= s < max(m, 2) and math.gcd(s, m) == 1:
                return s
    return 1


def _dual_cd(x, y, upper, max_epochs, tol):
    """Dual CD for min_w 1/2 ||w||^2 + sum_i upper_i max(0, 1 - y_i w.x_i); x has a bias column."""
    m = x.shape[0]
    q = jnp.sum(x * x, axis=1)
    stride = _stride(m)

    def sweep(state):
        alpha, w, epoch, _ = state
        offset = (epoch * 7919) % m  # a different starting point each epoch

        def visit(j, inner):
            alpha, w, pg_max, pg_min = inner
            i = (j * stride + offset) % m
            g = y[i] * jnp.dot(w, x[i]) - 1.0
            a, u = alpha[i], upper[i]
            pg = jnp.where(a <= 0, jnp.minimum(g, 0.0), jnp.where(a >= u, jnp.maximum(g, 0.0), g))
            pg = jnp.where(u > 0, pg, 0.0)  # masked-out samples never move
            new_a = jnp.where(q[i] > 0, jnp.clip(a - g / jnp.where(q[i] > 0, q[i], 1.0), 0.0, u), a)
            w = w + (new_a - a) * y[i] * x[i]
            return alpha.at[i].set(new_a), w, jnp.maximum(pg_max, pg), jnp.minimum(pg_min, pg)

        alpha, w, pg_max, pg_min = jax.lax.fori_loop(
            0, m, visit, (alpha, w, jnp.asarray(-jnp.inf, x.dtype), jnp.asarray(jnp.inf, x.dtype))
        )
        return alpha, w, epoch + 1, pg_max - pg_min

    def not_done(state):
        return (state[2] < max_epochs) & (state[3] > tol)

    init = (jnp.zeros((m,), x.dtype), jnp.zeros((x.shape[1],), x.dtype), 0, jnp.asarray(jnp.inf, x.dtype))
    alpha, w, epochs, gap = jax.lax.while_loop(not_done, sweep, init)
    return w, epochs, gap <= tol


def _fit_svm(x, y, mask, c, max_epochs, tol, standardize):
    weights = mask.astype(x.dtype)
    if standardize:
        total = jnp.maximum(jnp.sum(weights), 1.0)
        mean = jnp.sum(x * weights[:, None], axis=0) / total
        var = jnp.sum(((x - mean) ** 2) * weights[:, None], axis=0) / total
        scale = jnp.where(var > 0, jnp.sqrt(var), 1.0)
    else:
        mean, scale = jnp.zeros(x.shape[1], x.dtype), jnp.ones(x.shape[1], x.dtype)
    xs = (x - mean) / scale
    xa = jnp.concatenate([xs, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)  # bias as a feature
    w, epochs, converged = _dual_cd(xa, y, c * weights, max_epochs, tol)
    return LinearSVM(w[:-1], w[-1], mean, scale, epochs, converged)


_fit_svm_jit = jax.jit(_fit_svm, static_argnames=("standardize",))


def fit_linear_svm(
    x,
    y,
    *,
    c: float = 1.0,
    mask=None,
    standardize: bool = True,
    max_epochs: int = 200,
    tol: float = 1e-3,
) -> LinearSVM:
    """Soft-margin linear SVM: min 1/2 ||(w, b)||^2 + c sum_i max(0, 1 - y_i (w.x_i + b)).

    y is in {-1, +1} (or {0, 1}, mapped to -1/+1). `mask` [M] (bool) drops samples without changing
    shapes, which lets `vmap` fit many SVMs on different subsets. With `standardize` the features
    are z-scored on the (masked) training data first. As in liblinear, the bias is an extra constant
    feature and is regularised too.
    Coordinates are visited in a fixed well-mixed order (deterministic results); training stops when
    the projected-gradient gap falls below `tol` or after `max_epochs` passes.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D [M, D] array, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")
    values = set(np.unique(np.asarray(y)).tolist())
    if not values <= {-1, 1} and not values <= {0, 1}:
        raise ValueError(f"y must hold labels in {{-1, +1}} or {{0, 1}}, got {sorted(values)}")
    y = jnp.where(y > 0, 1.0, -1.0).astype(jnp.float32)
    mask = jnp.ones(x.shape[0], bool) if mask is None else jnp.asarray(mask, bool)
    if mask.shape != (x.shape[0],):
        raise ValueError(f"mask must have shape ({x.shape[0]},), got {mask.shape}")
    if c <= 0:
        raise ValueError(f"c must be > 0, got {c}")
    return _fit_svm_jit(x, y, mask, jnp.float32(c), max_epochs, jnp.float32(tol), standardize)


def svm_accuracy(svm: LinearSVM, x, y, mask=None) -> jax.Array:
    """Fraction of (masked) samples classified right; y in {-1, +1} or {0, 1}."""
    y = jnp.asarray(y) > 0
    correct = (svm_decision(svm, x) > 0) == y
    if mask is None:
        return jnp.mean(correct)
    mask = jnp.asarray(mask, bool)
    return jnp.sum(correct & mask) / jnp.sum(mask)


# --------------------------------------------------------------------------------------------------
# Consistency


def _pool_features(features):
    if features.ndim == 4:  # [N, h, w, D] feature maps: average over space
        features = jnp.mean(features, axis=(1, 2))
    if features.ndim != 2:
        raise ValueError(f"feature_fn must return [N, D] or [N, h, w, D] features, got shape {features.shape}")
    return features


def concept_pair_features(
    images,
    concept_ids,
    *,
    concepts_fn: ConceptsFn,
    translator_fn: TranslatorFn,
    synthesis_fn: SynthesisFn,
    feature_fn: FeatureFn,
    amplification: float = 4.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Features of x+ (phi_k * amplification) and x- (phi_k = 0) per concept (pure and jit-able).

    Returns (plus [J, N, D], minus [J, N, D], activation [J, N] = maxpool(phi_k)). `feature_fn` gives
    the classifier's stage-2 features; 4-D outputs are spatially averaged.
    """
    images = check_rgb_images(images)
    concept_ids = jnp.asarray(concept_ids, jnp.int32)
    phi, phi_prime = concepts_fn(images)
    phi = check_phi(phi, "concepts_fn output phi")
    n = phi.shape[0]

    def one(k):
        ids = jnp.full((n,), k)

        def feats(factor):
            edited = scale_concepts(phi, ids, jnp.full((n,), factor, phi.dtype))
            return _pool_features(feature_fn(decode_concepts(translator_fn, synthesis_fn, edited, phi_prime)))

        return feats(amplification), feats(0.0), jnp.max(phi[..., k], axis=(1, 2))

    return jax.lax.map(one, concept_ids)


_pair_features = jax.jit(
    concept_pair_features, static_argnames=("concepts_fn", "translator_fn", "synthesis_fn", "feature_fn")
)


@functools.partial(jax.jit, static_argnames=("standardize",))
def _fit_and_score(x_train, y_train, m_train, x_test, y_test, m_test, c, max_epochs, standardize):
    """One SVM per concept (vmapped): (test accuracy [J], train accuracy [J])."""

    def one(xt, yt, mt, xv, yv, mv):
        svm = _fit_svm(xt, yt, mt, c, max_epochs, jnp.float32(1e-3), standardize)
        return svm_accuracy(svm, xv, yv, mv), svm_accuracy(svm, xt, yt, mt)

    return jax.vmap(one)(x_train, y_train, m_train, x_test, y_test, m_test)


class Consistency(NamedTuple):
    concept_ids: np.ndarray  # [J]
    accuracy: np.ndarray  # [J] test accuracy of each concept's SVM (NaN if no test pair was used)
    train_accuracy: np.ndarray  # [J]
    test_pairs: np.ndarray  # [J] test pairs used (images where the concept is active)
    mean: float  # over concepts with a finite accuracy
    std: float


def consistency(
    train_batches: Iterable,
    test_batches: Iterable,
    *,
    concepts_fn: ConceptsFn,
    translator_fn: TranslatorFn,
    synthesis_fn: SynthesisFn,
    feature_fn: FeatureFn,
    concept_ids=None,
    amplification: float = 4.0,
    min_activation: float | None = 0.0,
    c: float = 1.0,
    standardize: bool = True,
    max_epochs: int = 200,
    concepts_per_pass: int | None = None,
) -> Consistency:
    """CC_k for every concept in `concept_ids` (default: all K): SVM on train pairs, accuracy on test pairs.

    Batches are image arrays or dicts with "image". Only images whose maxpool(phi_k) exceeds
    `min_activation` (default 0: the concept is active) contribute pairs for concept k (an inactive
    concept gives x+ == x-, an unlearnable pair); None uses every image. A concept with no test pair
    gets NaN and is left out of mean and std. The pair features of all concepts are held in memory ([J, 2N, D] per split);
    `concepts_per_pass` bounds J by making several passes over the data, which then must be
    re-iterable (e.g. lists of batches, not one-shot iterators).
    """
    if c <= 0:
        raise ValueError(f"c must be > 0, got {c}")
    if concepts_per_pass is not None:
        if concepts_per_pass < 1:
            raise ValueError(f"concepts_per_pass must be >= 1, got {concepts_per_pass}")
        if iter(train_batches) is train_batches or iter(test_batches) is test_batches:
            raise ValueError("concepts_per_pass needs re-iterable batches (e.g. lists), not one-shot iterators")
    if concept_ids is None:
        it = iter(train_batches)
        first = next(it, None)
        if first is None:
            raise ValueError("train_batches is empty")
        concept_ids = np.arange(jax.eval_shape(concepts_fn, _batch_images(first))[0].shape[-1])
        if it is train_batches:  # a one-shot iterator: put the peeked batch back
            train_batches = itertools.chain([first], it)
    concept_ids = np.asarray(concept_ids)
    if concept_ids.ndim != 1 or concept_ids.size == 0 or not np.issubdtype(concept_ids.dtype, np.integer):
        raise ValueError(
            f"concept_ids must be a non-empty 1-D integer array, got {concept_ids.dtype} {concept_ids.shape}"
        )

    def collect(batches, ids, split):
        chunks = [
            _pair_features(
                _batch_images(b), jnp.asarray(ids, jnp.int32), concepts_fn=concepts_fn, translator_fn=translator_fn,
                synthesis_fn=synthesis_fn, feature_fn=feature_fn, amplification=jnp.float32(amplification),
            )
            for b in batches
        ]
        if not chunks:
            raise ValueError(f"{split}_batches is empty")
        plus, minus, act = (jnp.concatenate(parts, axis=1) for parts in zip(*chunks))
        x = jnp.concatenate([plus, minus], axis=1)  # [J, 2N, D]
        y = jnp.concatenate([jnp.ones(plus.shape[:2]), -jnp.ones(minus.shape[:2])], axis=1)
        use = jnp.ones(act.shape, bool) if min_activation is None else act > min_activation
        return x, y, jnp.concatenate([use, use], axis=1)

    per_pass = concept_ids.size if concepts_per_pass is None else concepts_per_pass
    accuracy, train_accuracy, test_pairs = [], [], []
    for start in range(0, concept_ids.size, per_pass):
        ids = concept_ids[start : start + per_pass]
        train = collect(train_batches, ids, "train")
        test = collect(test_batches, ids, "test")
        acc, train_acc = _fit_and_score(*train, *test, jnp.float32(c), max_epochs, standardize)
        accuracy.append(np.asarray(acc))
        train_accuracy.append(np.asarray(train_acc))
        test_pairs.append(np.asarray(jnp.sum(test[2], axis=1)) // 2)
    accuracy, train_accuracy = np.concatenate(accuracy), np.concatenate(train_accuracy)
    finite = accuracy[np.isfinite(accuracy)]
    mean = float(np.mean(finite)) if finite.size else float("nan")
    std = float(np.std(finite)) if finite.size else float("nan")
    return Consistency(concept_ids, accuracy, train_accuracy, np.concatenate(test_pairs), mean, std)
