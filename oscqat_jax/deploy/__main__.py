"""``python -m oscqat_jax.deploy check MODEL.onnx --config=... --workdir=...``: see
:mod:`oscqat_jax.deploy.check`."""

import sys

COMMANDS = ("check",)


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(
            "usage: python -m oscqat_jax.deploy {check} ...\n\n"
            "commands:\n"
            "  check MODEL.onnx --config=... --workdir=...  an exported ONNX model against its "
            "checkpoint (python -m oscqat_jax.deploy check --help)"
        )
        return 0
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
