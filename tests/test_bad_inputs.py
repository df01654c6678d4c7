"""Every row of the documented bad-input table raises its documented error, before any work."""

import pytest

from experiments.bad_inputs import CASES, CLI_CASES, run_case, run_cli_case


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gives_documented_error(case):
    run_case(case)


def test_table_is_not_empty_and_messages_are_specific():
    assert len(CASES) >= 20
    assert all(len(c.message) > 15 for c in CASES)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.what for c in CLI_CASES])
def test_bad_command_line_exits_2_with_one_line_before_any_work(case):
    run_cli_case(case)


def test_command_line_cases_cover_the_families():
    assert len(CLI_CASES) >= 40
