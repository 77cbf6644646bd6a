"""PyTorch eager reference for ``train_step.py``'s ``fp`` case: the same float MobileNetV2 step.

    python benchmarks/torch_reference.py                 # batch 128, 32x32, 1000 classes
    python benchmarks/torch_reference.py --channels_last

The network is torchvision's ``mobilenet_v2`` (width 1.0: 3,504,872 parameters at 1000
classes) written out here, so torchvision is not needed, with global average pooling and no
dropout like ``oscqat_jax.models.MobileNetV2``. One step is forward, cross-entropy,
backward and an SGD update (momentum 0.9, weight decay 5e-5) in training mode (BatchNorm on
batch statistics), as the float phase of the training program. Prints one JSON line with the
median of ``--steps`` steps after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

# Run as a script from a clone: make the repository's package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oscqat_jax.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTING

# The same stage table as the Flax model, so both sides time one network.
SETTING = INVERTED_RESIDUAL_SETTING


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, relu: bool = True):
    layers = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = [] if expand == 1 else [conv_bn(c_in, hidden, 1, 1)]
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, c_out, 1, 1, relu=False),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [conv_bn(3, 32, 3, 2)], 32
        for expand, c_out, repeats, stride in SETTING:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        layers.append(conv_bn(c_in, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels_last", action="store_true", help="NHWC memory format")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = MobileNetV2(args.num_classes).train()
    images = torch.randn(args.batch, 3, args.resolution, args.resolution)
    labels = torch.randint(0, args.num_classes, (args.batch,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)

    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    record = {
        "framework": f"torch {torch.__version__} eager",
        "threads": torch.get_num_threads(),
        "channels_last": args.channels_last,
        "parameters": sum(p.numel() for p in model.parameters()),
        "resolution": args.resolution,
        "batch": args.batch,
        "steps": len(times),
        "median_step_s": median,
        "min_step_s": min(times),
        "images_per_s": args.batch / median,
        "final_loss": loss.item(),
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
