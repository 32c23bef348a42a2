"""`viscoin-jax convert`: published weights -> files this project loads (no network access).

    viscoin-jax convert stylegan2 network.pkl OUT_DIR [--networks G_ema,D]
    viscoin-jax convert resnet resnet50.pth OUT_DIR [--depth 50 --num-classes 1000]
    viscoin-jax convert inception pt_inception-2015-12-05-6726825d.pth OUT(.npz|dir)
    viscoin-jax convert lpips vgg16-397923af.pth vgg.pth OUT(.npz|dir)

torch is needed only to read `.pth` files (`pip install -e '.[convert]'`); pickles are read by a
restricted unpickler that never runs code from the file. See docs/fid.md for the FID/LPIPS files.
"""

from __future__ import annotations

import argparse
import sys

# Each converter (Flax, Orbax; torch for .pth files) is imported when its command runs, not when the
# command line is parsed: `viscoin-jax --help` builds this command's parser.


def _resnet(args) -> int:
    from .torchvision_resnet import convert_resnet, save_resnet_checkpoint
    model = convert_resnet(args.pth, depth=args.depth, num_classes=args.num_classes)
    print(f"wrote {save_resnet_checkpoint(model, args.out_dir)}")
    return 0


def _inception(args) -> int:
    from .inception_weights import convert_fid_inception
    print(f"wrote {convert_fid_inception(args.pth, args.out, overwrite=args.force)}")
    return 0


def _lpips(args) -> int:
    from .lpips_weights import convert_lpips_vgg
    print(f"wrote {convert_lpips_vgg(args.vgg16_pth, args.lin_pth, args.out, overwrite=args.force)}")
    return 0


def _stylegan2(args) -> int:
    from .stylegan2_pickle import convert_stylegan2
    networks = tuple(n.strip() for n in args.networks.split(",") if n.strip())
    out = convert_stylegan2(args.pkl, args.out_dir, networks=networks, overwrite=args.force)
    print(f"wrote {', '.join(networks)} to {out}")
    return 0


def _guard(func):
    def run(args):
        try:
            return func(args)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"viscoin-jax convert: error: {e}", file=sys.stderr)
            return 2
    return run


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert published weights (StyleGAN2-ADA, torchvision, "
                              "FID Inception, LPIPS)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    sg = sub.add_parser("stylegan2", help="official StyleGAN2-ADA pickle (network-snapshot-*.pkl), read "
                        "without running it, to Orbax checkpoints")
    sg.add_argument("pkl", help="official StyleGAN2-ADA network pickle (network-snapshot-*.pkl)")
    sg.add_argument("out_dir", help="directory for the Orbax checkpoints and config.json")
    sg.add_argument("--networks", default="G_ema,D",
                    help="comma-separated networks to convert, from G, G_ema, D (default: G_ema,D)")
    sg.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    sg.set_defaults(func=_guard(_stylegan2))
    r = sub.add_parser("resnet", help="torchvision ResNet state dict (.pth)")
    r.add_argument("pth")
    r.add_argument("out_dir")
    r.add_argument("--depth", type=int, default=50)
    r.add_argument("--num-classes", type=int, default=None, help="checked against the weights")
    r.set_defaults(func=_guard(_resnet))
    i = sub.add_parser("inception", help="pytorch-fid Inception weights (.pth)")
    i.add_argument("pth")
    i.add_argument("out")
    i.add_argument("--force", action="store_true")
    i.set_defaults(func=_guard(_inception))
    lp = sub.add_parser("lpips", help="torchvision VGG16 + LPIPS linear layers (.pth)")
    lp.add_argument("vgg16_pth")
    lp.add_argument("lin_pth")
    lp.add_argument("out")
    lp.add_argument("--force", action="store_true")
    lp.set_defaults(func=_guard(_lpips))
