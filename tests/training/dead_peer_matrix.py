"""The kill cases of test_dead_peer.py that the suite leaves out, each as costly as the one
it runs (a two-process run killed, then resumed: 1.5 to 2 minutes on two cores):

    python tests/training/dead_peer_matrix.py            # the cases the suite leaves out
    python tests/training/dead_peer_matrix.py --all      # every case, the suite's one too

Run it after a change to the peer watch (oscqat_jax/training/peers.py), the distributed
start-up or the checkpointer's multi-process saves. It is pytest under the hood (the suite's
conftest, fixtures and compilation cache); other arguments go to pytest.
"""

import pathlib
import sys

import pytest

if __name__ == "__main__":
    # The repository's package, then pytest on this file (named explicitly: it does not match
    # the suite's test_*.py pattern), in one process, where the cases share one uninterrupted
    # run; pytest imports the file again, with the suite's conftest in place.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    passed = [a for a in sys.argv[1:] if a != "--all"]
    sys.exit(pytest.main([__file__, "-n", "0", "-p", "no:cacheprovider", *passed]))

from test_dead_peer import (  # noqa: E402  (after the guard: the conftest puts tests/ on the path)
    CASES,
    SUITE_CASE,
    cache,
    check_kill_case,
    uninterrupted,
)

__all__ = ["cache", "uninterrupted"]  # fixtures of test_dead_peer.py, found here by name

MATRIX = sorted(CASES) if "--all" in sys.argv else sorted(set(CASES) - {SUITE_CASE})


@pytest.mark.parametrize("case", MATRIX)
def test_a_killed_process_ends_the_other_and_the_run_resumes(case, uninterrupted, cache, tmp_path):
    check_kill_case(case, uninterrupted, cache, str(tmp_path / "run"))
