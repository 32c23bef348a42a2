"""The NVlabs side of `viscoin-jax bench-stylegan2 --compare-nvlabs PATH`, run in a subprocess.

PATH is the user's own checkout of NVlabs' stylegan2-ada-pytorch (nothing of it ships with this
project). This worker builds NVlabs' Generator / Discriminator and StyleGAN2Loss with the widths and
loss settings it is given, warms up, then times one unit of work each time a line "run" arrives on
stdin and answers with one JSON line {"seconds": ...}, so the caller can alternate it with its own
measurements in one run ("profile" answers {"buckets": {...}}: where one unit's time goes). Units:

- "g": G forward + backward, loss mean(img^2), gradients w.r.t. every parameter, random noise;
- "step": one R1 period of training steps: every step Gmain and Dmain (non-saturating logistic
  loss, style mixing) with Adam updates and the G_ema update, the lazy R1 step (Dreg, gain =
  interval) at the first; no augmentation, no path length (the caller configures its side alike).

    python -m viscoin_jax.benchmarks.nvlabs_worker PATH '{"unit": "g", "resolution": 64, ...}'
"""

from __future__ import annotations

import copy
import json
import sys
import time


def _build(spec):
    import torch
    from training.loss import StyleGAN2Loss
    from training.networks import Discriminator, Generator

    torch.manual_seed(int(spec.get("seed", 0)))
    res = int(spec["resolution"])
    g = Generator(z_dim=spec["z_dim"], c_dim=0, w_dim=spec["w_dim"], img_resolution=res, img_channels=3,
                  mapping_kwargs=dict(num_layers=spec["mapping_layers"]),
                  synthesis_kwargs=dict(channel_base=spec["channel_base"], channel_max=spec["channel_max"],
                                        num_fp16_res=0, conv_clamp=spec.get("conv_clamp")))
    d = Discriminator(c_dim=0, img_resolution=res, img_channels=3,
                      channel_base=spec["channel_base"], channel_max=spec["channel_max"],
                      num_fp16_res=0, conv_clamp=spec.get("conv_clamp"),
                      epilogue_kwargs=dict(mbstd_group_size=spec.get("mbstd_group_size", 4)))
    loss = StyleGAN2Loss(torch.device("cpu"), g.mapping, g.synthesis, d, augment_pipe=None,
                         style_mixing_prob=spec["style_mixing_prob"], r1_gamma=spec["r1_gamma"],
                         pl_weight=0)
    return g, d, loss


def make_unit(spec):
    """A function running one unit of work (see the module docstring)."""
    import torch

    g, d, loss = _build(spec)
    batch, res = int(spec["batch"]), int(spec["resolution"])
    if spec["unit"] == "g":
        params = list(g.parameters())

        def run():
            for p in params:
                p.grad = None
            z = torch.randn(batch, g.z_dim)
            img = g(z, None, noise_mode="random")
            (img ** 2).mean().backward()
        return run

    interval = int(spec["r1_interval"])
    adam = dict(lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    opt_g = torch.optim.Adam(g.parameters(), **adam)
    opt_d = torch.optim.Adam(d.parameters(), **adam)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    real = torch.rand(batch, 3, res, res) * 2 - 1
    c = torch.zeros(batch, 0)

    def phase(name, opt, module, gain=1.0):
        opt.zero_grad(set_to_none=True)
        module.requires_grad_(True)
        loss.accumulate_gradients(phase=name, real_img=real, real_c=c, gen_z=torch.randn(batch, g.z_dim),
                                  gen_c=c, sync=True, gain=gain)
        module.requires_grad_(False)
        opt.step()

    def run(steps=interval):
        for i in range(steps):
            phase("Gmain", opt_g, g)
            phase("Dmain", opt_d, d)
            if i == 0 and spec["r1_gamma"] > 0:
                phase("Dreg", opt_d, d, gain=float(interval))
            with torch.no_grad():
                for p_ema, p in zip(g_ema.parameters(), g.parameters()):
                    p_ema.copy_(p.lerp(p_ema, 0.999))
    return run


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, spec = argv[0], json.loads(argv[1])
    sys.path.insert(0, path)
    import torch

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    run = make_unit(spec)
    if spec["unit"] == "step":
        run(2)  # warm-up: a step with the lazy R1 and one without (as the caller)
    else:
        run()
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__}),
          flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "profile":  # one unit under torch.profiler, self CPU seconds per bucket
            # only when profiling: the worker otherwise imports nothing of viscoin_jax (nor JAX)
            from viscoin_jax.benchmarks.op_profile import torch_profile

            print(json.dumps({"buckets": torch_profile(run)}), flush=True)
            continue
        if command != "run":
            break
        t0 = time.perf_counter()
        run()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
