"""``python -m oscqat_jax.deploy check MODEL.onnx --config=... --workdir=...``: see
:mod:`oscqat_jax.deploy.check`."""

import sys

COMMANDS = ("check",)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        given = f"got {argv[0]!r}" if argv else "got none"
        print(
            f"Error: python -m oscqat_jax.deploy takes a command, one of {', '.join(COMMANDS)} "
            f"({given}); e.g. python -m oscqat_jax.deploy check model.onnx --config=... "
            "--workdir=...",
            file=sys.stderr,
        )
        return 1
    from oscqat_jax.deploy import check

    return check.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
