"""``python -m oscqat_jax.convert``: see :func:`oscqat_jax.convert.main`."""

import sys

from oscqat_jax.convert.conversion import main

if __name__ == "__main__":
    sys.exit(main())
