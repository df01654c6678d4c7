"""Every row of the documented bad-input table raises its documented error, before any work."""

import pytest

from experiments.bad_inputs import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gives_documented_error(case):
    run_case(case)


def test_table_is_not_empty_and_messages_are_specific():
    assert len(CASES) >= 20
    assert all(len(c.message) > 15 for c in CASES)
