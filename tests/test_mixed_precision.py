"""StyleGAN2's mixed precision as the reference's: the `num_fp16_res` highest resolutions compute in a
reduced dtype (bfloat16 here), float32 master weights, and it still trains."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from viscoin_jax.models import stylegan2 as sg

SMALL = dict(channel_base=256, channel_max=32)


def test_block_dtypes_follow_the_reference_rule():
    # reference: fp16_resolution = max(2 ** (log2(R) + 1 - num_fp16_res), 8); a block is fp16 when res >= it
    for img_res in (8, 16, 64, 256, 1024):
        for num in range(0, 6):
            for res in [2 ** i for i in range(2, int(math.log2(img_res)) + 1)]:
                threshold = max(2 ** (int(math.log2(img_res)) + 1 - num), 8)
                want = jnp.bfloat16 if (num > 0 and res >= threshold) else jnp.float32
                assert sg.block_dtype(res, img_res, num, "bfloat16") == want, (img_res, num, res)
    assert sg.block_dtype(256, 256, 4, "auto") == jnp.float32  # auto on CPU: float32
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        sg.Generator(z_dim=8, w_dim=8, img_resolution=16, mixed_precision="half", rngs=nnx.Rngs(0), **SMALL)


def _pair(num_fp16_res):
    mk = lambda mp: sg.Generator(z_dim=16, w_dim=16, img_resolution=16, mapping_layers=2, num_fp16_res=num_fp16_res,
                                 mixed_precision=mp, conv_clamp=256.0, impl="xla", rngs=nnx.Rngs(3), **SMALL)
    return mk("float32"), mk("bfloat16")


def test_reduced_blocks_run_in_bfloat16_and_stay_near_float32():
    g32, g16 = _pair(num_fp16_res=2)
    assert [getattr(g16.synthesis, f"b{r}").dtype for r in (4, 8, 16)] == [jnp.float32, jnp.bfloat16, jnp.bfloat16]
    # master weights: every parameter float32, the same values as the float32 model's
    for a, b in zip(jax.tree.leaves(nnx.state(g32, nnx.Param)), jax.tree.leaves(nnx.state(g16, nnx.Param))):
        assert b.dtype == jnp.float32 and np.array_equal(np.asarray(a), np.asarray(b))
    z = jax.random.normal(jax.random.key(1), (3, 16))
    y32, y16 = np.asarray(g32(z)), np.asarray(g16(z))
    assert y16.dtype == np.float32  # the image path is float32
    assert not np.array_equal(y32, y16)  # something did run in bfloat16
    np.testing.assert_allclose(y16, y32, atol=0.05 * np.abs(y32).max())  # within bf16 rounding
    jaxpr = str(jax.make_jaxpr(lambda z: g16(z))(z))
    assert "bf16[3,16,16" in jaxpr  # the 16 px block's convolutions run in bfloat16


def test_discriminator_reduced_blocks_and_float32_logits():
    mk = lambda mp: sg.Discriminator(img_resolution=16, num_fp16_res=2, mixed_precision=mp, mbstd_group_size=2,
                                     impl="xla", rngs=nnx.Rngs(4), **SMALL)
    d32, d16 = mk("float32"), mk("bfloat16")
    assert [getattr(d16, f"b{r}").dtype for r in (16, 8)] == [jnp.bfloat16, jnp.bfloat16]
    img = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1)
    a, b = np.asarray(d32(img)), np.asarray(d16(img))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=0.05 * max(1.0, np.abs(a).max()))


def test_a_bfloat16_training_step_lowers_the_loss():
    """Adam on float32 master weights through bfloat16 blocks: fitting G's output to a fixed image,
    the loss falls over a few steps, and the parameters stay float32."""
    _, g = _pair(num_fp16_res=2)
    z = jax.random.normal(jax.random.key(5), (4, 16))
    target = jax.random.uniform(jax.random.key(6), (4, 16, 16, 3), minval=-0.5, maxval=0.5)
    graphdef, params, rest = nnx.split(g, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        return jnp.mean(jnp.square(model(z) - target))

    @jax.jit
    def step(params, opt):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for _ in range(12):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses


def test_the_trainer_loss_scales_exactly_the_float16_networks():
    from viscoin_jax.trainers import stylegan2 as trainer
    from viscoin_jax.training.config import load_config

    config = load_config("stylegan2_synthetic", ["--config.model.generator.num_fp16_res=2",
                                                 "--config.model.generator.mixed_precision=float16",
                                                 "--config.model.discriminator.num_fp16_res=2",
                                                 "--config.model.discriminator.mixed_precision=bfloat16"])
    task = trainer.make_task(config)
    assert task.scaled == {"G": True, "D": False}  # bfloat16 has float32's range: no scale
    state = jax.eval_shape(task.init, jax.random.key(0))
    assert "G_loss_scale" in state and "D_loss_scale" not in state
    for bad, match in (("--config.stylegan2.loss_scale_period=0", "loss_scale_period must be >= 1"),
                       ("--config.stylegan2.loss_scale_initial=0.5", "loss_scale_initial must be >= 1")):
        with pytest.raises(ValueError, match=match):
            trainer.make_task(load_config("stylegan2_synthetic", [bad]))
