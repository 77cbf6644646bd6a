"""Entry point of the oscqat_jax training program.

The training program (data, the sharded QAT step, evaluation, checkpoints) is not built yet;
until it is, this prints what the default run will do and exits with status 2 rather than
pretending to train.
"""

import sys

PLAN = """oscqat_jax: the training program is not built yet.
The default run will: train a width-reduced MobileNetV2 in float on scikit-learn's 8x8 digits
(upsampled to 32x32, fixed train/validation split), initialise the quantizer ranges (MSE),
fine-tune it with W3A3 quantization-aware training and iterative weight freezing, re-estimate
BatchNorm statistics, and print float and quantized accuracy, oscillating and frozen fractions.
The functional core it will use is ready: see README.md, 'Use it from your own JAX code'."""


def main() -> int:
    print(PLAN)
    return 2


if __name__ == "__main__":
    sys.exit(main())
