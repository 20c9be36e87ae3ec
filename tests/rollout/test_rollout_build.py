"""Which build of the extension is under test."""
import os

from minirlhf import _rollout


def test_the_expected_build_is_imported():
    # .ci/sanitize.sh sets this to its ASan build: a test run against the normal build would prove nothing.
    where = os.environ.get("MINIRLHF_EXPECT_ROLLOUT_IN")
    if where:
        assert os.path.realpath(_rollout.__file__).startswith(os.path.realpath(where)), _rollout.__file__
