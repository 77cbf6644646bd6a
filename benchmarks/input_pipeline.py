"""Times the file-based training input pipelines (issue 4): images per second each source
delivers with N decoding workers, and how many host cores an accelerator's rate needs.

Every case reads through the sources the trainer uses (``data.folder.imagenet_folder`` and
``data.tfds.tfds_source``): the paper's training augmentation (random-resized crop, flip,
bilinear resize, normalisation) of JPEGs to float32 NHWC batches.

    python benchmarks/input_pipeline.py          # a synthetic ImageNet-like folder, 0/1/2 workers
    python benchmarks/input_pipeline.py --workers=4,8 --steps=20 --target_img_s=3800
    python benchmarks/input_pipeline.py --dir=/data/imagenet --sources=folder --workers=16

Without ``--dir`` a folder of ``--num_classes x --images_per_class`` smooth random JPEGs of
about 500x375 pixels (ImageNet's typical size) is written to a temporary directory. The tfds
sources (``array_record``, ``tfrecord``) are prepared from the folder's images in temporary
data dirs, so use them with small folders only.

Each case prints one JSON line: ``images_per_s`` over ``--steps`` batches after one untimed
batch (which includes starting the workers), ``per_worker_images_per_s`` (the rate divided by
the workers, at least 1), and ``cores_for_target``: ``ceil(target_img_s / per-worker rate)``,
the decoding cores an accelerator consuming ``--target_img_s`` needs (plus one for the main
process). A table of all cases follows. With 0 workers grain decodes in the main process;
the tfrecord path decodes in threads (``max(1, workers)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Run as a script from a clone: make the repository's package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oscqat_jax.training import config as config_lib
from oscqat_jax.training.data import folder as folder_lib
from oscqat_jax.training.data import tfds as tfds_lib

SOURCES = ("folder", "array_record", "tfrecord")
TFDS_NAME = "input_pipeline_benchmark"


def write_folder(root: str, *, num_classes: int, per_class: int, seed: int = 0) -> str:
    """``root/{train,val}/<class>/*.JPEG``: smooth random 500x375 (or 375x500) images."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(1, per_class // 10))):
        for c in range(num_classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                size = (500, 375) if rng.random() < 0.75 else (375, 500)
                coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
                noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (*size[::-1], 3))
                pixels = np.clip(noisy, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)
    return root


def prepare_tfds(folder: str, data_dir: str, file_format: str) -> None:
    """The folder's images, in its order, as a tfds dataset ``TFDS_NAME`` in ``data_dir``."""
    import tensorflow_datasets as tfds

    classes = sorted(os.listdir(os.path.join(folder, "train")))

    def files(split):
        for label, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(folder, split, name))):
                yield os.path.join(folder, split, name, file), label

    class InputPipelineBenchmark(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=classes),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in ("train", "val")}

        def _generate_examples(self, split):
            for key, (path, label) in enumerate(files(split)):
                with open(path, "rb") as f:
                    yield key, {"image": f.read(), "label": label}

    InputPipelineBenchmark(data_dir=data_dir).download_and_prepare(file_format=file_format)


def case_config(source: str, folder: str, tfds_dir: str, args, workers: int):
    c = config_lib.base_config().data
    c.image_size = args.image_size
    c.num_workers = workers
    c.prefetch = args.prefetch
    if source == "folder":
        c.name, c.dir = "imagenet_folder", folder
    else:
        c.name, c.tfds_name, c.tfds_data_dir = "tfds", TFDS_NAME, tfds_dir
        c.tfds_format, c.val_split = source, "val"
    return c


def measure(source, *, batch_size: int, steps: int) -> float:
    """Images per second over ``steps`` batches, after one untimed batch."""
    batches = source.train_batches(0, batch_size=batch_size, seed=0)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - start
    batches.close()
    return steps * batch_size / seconds


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="", help="an ImageNet-style folder (default: generate)")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--images_per_class", type=int, default=40)
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--target_img_s", type=float, default=3800.0)
    args = parser.parse_args(argv)
    sources = args.sources.split(",")
    for name in sources:
        if name not in SOURCES:
            parser.error(f"--sources: {name!r} is not one of {', '.join(SOURCES)}")
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        folder = args.dir or write_folder(
            os.path.join(tmp, "folder"),
            num_classes=args.num_classes,
            per_class=args.images_per_class,
        )
        tfds_dirs = {}
        for name in sources:
            if name != "folder":
                tfds_dirs[name] = os.path.join(tmp, name)
                prepare_tfds(folder, tfds_dirs[name], name)
        results = []
        for name in sources:
            for n in workers:
                config = case_config(name, folder, tfds_dirs.get(name, ""), args, n)
                load = folder_lib.imagenet_folder if name == "folder" else tfds_lib.tfds_source
                source = load(config)
                rate = measure(source, batch_size=args.batch_size, steps=args.steps)
                source.close()
                per_worker = rate / max(1, n)
                result = {
                    "source": name,
                    "workers": n,
                    "batch_size": args.batch_size,
                    "image_size": args.image_size,
                    "steps": args.steps,
                    "images_per_s": round(rate, 1),
                    "per_worker_images_per_s": round(per_worker, 1),
                    "target_img_s": args.target_img_s,
                    "cores_for_target": math.ceil(args.target_img_s / per_worker),
                    "host_cpus": os.cpu_count(),
                }
                print(json.dumps(result), flush=True)
                results.append(result)
    print_table(results, args.target_img_s)
    return results


def print_table(results: list[dict], target: float) -> None:
    print(f"\n{'source':<13} {'workers':>7} {'img/s':>8} {'img/s/worker':>12} {'cores':>6}")
    for r in results:
        print(
            f"{r['source']:<13} {r['workers']:>7} {r['images_per_s']:>8.1f} "
            f"{r['per_worker_images_per_s']:>12.1f} {r['cores_for_target']:>6}"
        )
    print(
        f"cores: decoding cores for {target:.0f} img/s at that case's per-worker rate "
        "(plus one for the main process)."
    )


if __name__ == "__main__":
    main()
