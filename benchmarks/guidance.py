"""python -m benchmarks.guidance --ckpt RUN: what classifier-free guidance does to a class-conditional run.

For each guidance scale w (1 = none), it samples every class from the same starting noise and
reports, per class and in the mean, KID against that class's test images and the share of the
samples a classifier labels as their class. The classifier is a small CNN trained here on the
run's training split (its accuracy on the real test images is reported beside it, as the
ceiling the samples are measured against). Writes guidance.json, a markdown table and a grid
with a row per class for each w, to $OUT when set, else benchmarks/results/."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_fast.argtypes import finite_float, number, positive_int, seed_int
from ddpm_fast.data import build_loader
from ddpm_fast.data.build import load_labelled
from ddpm_fast.schedulers import DEFAULT_METHOD, DEFAULT_STEPS, METHODS

from .common import DEVICE, write_result
from .report_parts import md_table


def classifier(num_classes: int) -> nn.Module:
    """Three conv blocks and a linear head: enough for flat-coloured classes at 32x32."""
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))


def train_classifier(data, image_size: int, num_classes: int, epochs: int, device: torch.device,
                     seed: int = 0) -> nn.Module:
    """Trained on the training split (flips on), as the run's model saw it."""
    torch.manual_seed(seed)
    net = classifier(num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loader = build_loader(data, image_size, 64, split="train", device=device, seed=seed, class_cond=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((net(images).argmax(1) == labels).float().mean())


def scales(text: str) -> tuple[float, ...]:
    """An argparse type: one or more comma-separated finite guidance scales ("1,1.5,2"), read here and
    not after the classifier's training."""
    try:
        out = tuple(finite_float(v) for v in text.replace(" ", "").split(",") if v)
    except argparse.ArgumentTypeError:
        out = ()
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,1.5,2, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.guidance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a class-conditional run folder or checkpoint")
    p.add_argument("--scales", type=scales, default="1,1.5,2,3,5", help="guidance scales w (1: no guidance)")
    # at least 2: each class's KID compares sets of 2 or more
    p.add_argument("--n", type=number(int, 2), default=64, help="samples per class and scale")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help="sampler (default: the library's measured default)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS)
    p.add_argument("--classifier-epochs", type=positive_int, default=2)
    p.add_argument("--seed", type=seed_int, default=0)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    from ddpm_fast import FastSampler, metrics
    from ddpm_fast.checkpoint import load_model
    from ddpm_fast.images import image_grid

    model, diffusion, cfg = load_model(args.ckpt, device=DEVICE)
    names = cfg.get("class_names")
    if not names:
        build_parser().error(f"--ckpt {args.ckpt} is an unconditional run: train one with --class-cond")
    size, data = cfg["model"]["image_size"], cfg.get("data")
    t0 = time.perf_counter()
    net = train_classifier(data, size, len(names), args.classifier_epochs, DEVICE, args.seed)
    test, test_labels, _ = load_labelled(data, size, "test")
    test, test_labels = test.to(DEVICE), test_labels.to(DEVICE)
    ref = {c: metrics.inception_features(test[test_labels == c]) for c in range(len(names))}
    result = {"classifier_test_accuracy": accuracy(net, test, test_labels),
              "classifier_s": round(time.perf_counter() - t0, 1), "scales": []}
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    x_T = torch.randn(args.n, 3, size, size, generator=gen, device=DEVICE)  # the same noise for every class and w
    grids = []
    for w in args.scales:
        sampler = FastSampler(model, diffusion, method=args.method, steps=args.steps, cfg_scale=w,
                              dtype=torch.float32)  # as the committed figures were sampled
        row = {"w": w, "classes": {}}
        shown = []
        for c, name in enumerate(names):
            images = sampler.sample(args.n, size, x_T=x_T, classes=torch.full((args.n,), c, device=DEVICE))
            feats = metrics.inception_features(images)
            kid, kid_std = metrics.kid(ref[c], feats, subsets=50, subset_size=min(len(ref[c]), args.n), seed=args.seed)
            row["classes"][name] = {"kid": kid, "kid_std": kid_std,
                                    "accuracy": accuracy(net, images, torch.full((args.n,), c, device=DEVICE))}
            shown.append(images[:8].cpu())
        row["mean_kid"] = sum(r["kid"] for r in row["classes"].values()) / len(names)
        row["mean_accuracy"] = sum(r["accuracy"] for r in row["classes"].values()) / len(names)
        result["scales"].append(row)
        grids.append((w, torch.cat(shown)))
        print(f"w {w:g}: mean KID {row['mean_kid']:.4f}, classified as their class {row['mean_accuracy']:.0%}",
              flush=True)
    env = {"device": str(DEVICE), "ckpt": str(args.ckpt), "n": args.n, "method": args.method, "steps": args.steps,
           "class_names": list(names)}
    path = write_result("guidance", {"env": env, "guidance": result})
    for w, images in grids:
        image_grid(images, nrow=8).save(path.with_name(f"guidance_w{w:g}.png"))
    table = md_table(["w", *(f"{n} KID / acc." for n in names), "mean KID", "mean acc."],
                     [[f"{row['w']:g}", *(f"{r['kid']:.4f} / {r['accuracy']:.0%}" for r in row["classes"].values()),
                       f"{row['mean_kid']:.4f}", f"{row['mean_accuracy']:.0%}"] for row in result["scales"]])
    path.with_suffix(".md").write_text(
        f"Classifier accuracy on the real test images: {result['classifier_test_accuracy']:.1%}.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
