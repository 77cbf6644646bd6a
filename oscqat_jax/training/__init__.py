"""The training program: data, optimizers, the sharded QAT step, evaluation, checkpoints, metrics."""
