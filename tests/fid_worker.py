"""One process of tests/test_multiprocess.py's FID test (or, without the JAX variables, the
one-process reference): FID and KID of a small seeded generator against real images, with a
counting feature extractor; writes what it got to OUT/process_<i>.npz. The generator, the images
and the extractor are built here, from fixed seeds, so every process and the test build the same."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from viscoin_jax.metrics import fid
from viscoin_jax.training.distributed import maybe_initialize_distributed

RES, DIM, BATCH = 6, 5, 4
N_REAL, N_FAKE = 37, 19  # 10 real chunks of 4 (the last 1 row), 5 generated batches (the last 3 used)


def real_images() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (N_REAL, RES, RES, 3)).astype(np.float32)


def real_batches(batch: int = 5):
    """The real images as an iterable of batches of another size than the FID's."""
    x = real_images()
    return [{"image": x[i:i + batch]} for i in range(0, len(x), batch)]


def projection() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((RES * RES * 3, DIM)).astype(np.float32) / 8


def counting_extractor():
    """(extractor, calls): tanh of a fixed projection of the pixels; `calls` counts its rows."""
    w = jnp.asarray(projection())
    fn = jax.jit(lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w))
    calls = []

    def features(images):
        calls.append(images.shape[0])
        return fn(images)
    return fid.FeatureExtractor(features, name="projection", comparable_with_published=False), calls


def generator_fn(key, batch_size):
    """A seeded 'generator': images from z ~ N(0, I) through a fixed map (a shifted mean, so the
    FID is not near 0)."""
    m = jnp.asarray(np.random.default_rng(3).standard_normal((8, RES * RES * 3)).astype(np.float32))
    z = jax.random.normal(key, (batch_size, 8))
    return jnp.tanh(z @ m * 0.5 + 0.3).reshape(batch_size, RES, RES, 3)


def run() -> dict:
    extractor, calls = counting_extractor()
    result = fid.compute_fid(real_batches(), generator_fn, extractor, n_samples=N_FAKE, batch_size=BATCH,
                             seed=7, n_real=N_REAL, kid=True, kid_subsets=5, kid_subset_size=10)
    rows = sum(calls)
    real = fid.feature_stats(real_images(), extractor, batch_size=BATCH, keep_features=True)
    fake = fid.generated_feature_stats(generator_fn, extractor, N_FAKE, batch_size=BATCH, seed=7)
    few = fid.feature_stats(real_images()[:3], extractor, batch_size=BATCH)  # one chunk: one process idle
    return dict(fid=result.value, kid=result.kid, n_real=result.n_real, n_fake=result.n_fake, rows=rows,
                real_mean=real.mean, real_cov=real.cov, real_features=real.features, fake_mean=fake.mean,
                fake_cov=fake.cov, few_n=few.n, few_mean=few.mean, few_cov=few.cov)


def main(out: str) -> None:
    maybe_initialize_distributed()
    np.savez(f"{out}/process_{jax.process_index()}.npz", **run())


if __name__ == "__main__":
    main(sys.argv[1])
