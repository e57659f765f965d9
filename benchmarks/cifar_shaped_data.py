"""Write random images in the CIFAR-10 file format, for timing runs where CIFAR-10 itself is absent.

    python benchmarks/cifar_shaped_data.py OUT [--train 50000] [--test 10000]
    qatbench bench --task cifar10-resnet20 --data-root OUT

The content is noise: use it for step times and memory, never for accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qatbench.tasks.cifar import write_cifar_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    n = args.train + args.test
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=generator)
    print(write_cifar_batches(args.out, images, labels, args.test) / "cifar-10-batches-py")


if __name__ == "__main__":
    main()
