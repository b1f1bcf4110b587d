"""Spec validation: every setting a user can get wrong is refused with a message naming it."""

from __future__ import annotations

import math

import pytest
from papermill.cli import _resolve_type

from airgpu_nb.errors import SpecError
from airgpu_nb.spec import (
    GpuRequest,
    PromotionSpec,
    normalise_schedule,
    parse_gpus,
    parse_value,
    safe_dag_id,
)


def spec(**changes):
    return PromotionSpec(**{"dag_id": "train", "notebook_name": "train.ipynb", **changes})


@pytest.mark.parametrize("text", ["1", "-3", "1.5", "1e3", "True", "False", "None", "true",
                                  "abc", "", " 7", "1_000", "nan", "0x10", "'quoted'", "ü"])
def test_parse_value_reads_like_papermill_cli(text):
    ours, theirs = parse_value(text), _resolve_type(text)
    assert type(ours) is type(theirs)
    assert ours == theirs or (isinstance(ours, float) and math.isnan(ours) and math.isnan(theirs))


@pytest.mark.parametrize("dag_id", ["train", "a.b-c_d", "X" * 250])
def test_valid_dag_ids_are_accepted(dag_id):
    assert spec(dag_id=dag_id).dag_id == dag_id


@pytest.mark.parametrize("dag_id", ["", "has space", "semi;colon", "x" * 251, "ünï", "a/b",
                                    "__import__('os')"])
def test_invalid_dag_ids_are_refused(dag_id):
    with pytest.raises(SpecError, match="invalid DAG id"):
        spec(dag_id=dag_id)


def test_safe_dag_id_turns_any_notebook_name_into_a_valid_id():
    assert safe_dag_id("My Training (v2)") == "My_Training_v2"
    assert safe_dag_id("...") == "notebook"
    spec(dag_id=safe_dag_id("ïñ strange/name"))  # must validate


@pytest.mark.parametrize("name", ["1abc", "class", "with space", "a-b", "", "None"])
def test_parameter_names_must_be_identifiers_and_not_keywords(name):
    with pytest.raises(SpecError, match="invalid parameter name"):
        spec(parameters=((name, 1),))


@pytest.mark.parametrize("name", ["gpus_requested", "allow_cpu"])
def test_check_cell_parameters_cannot_be_shadowed(name):
    with pytest.raises(SpecError, match="belongs to the GPU check"):
        spec(parameters=((name, 1),))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_because_they_have_no_literal(value):
    with pytest.raises(SpecError, match="-r"):
        spec(parameters=(("x", value),))


def test_awkward_string_values_are_accepted_unchanged():
    awkward = "it's \"quoted\"\nnew line \\ back ünïcødé 🚀 ${HOME} `id`"
    assert spec(parameters=(("x", awkward),)).params == {"x": awkward}


@pytest.mark.parametrize("schedule", [None, "@daily", "@once", "0 2 * * *", "*/5 * * * 1-5"])
def test_valid_schedules(schedule):
    assert spec(schedule=schedule).schedule == schedule


@pytest.mark.parametrize("schedule", ["@sometimes", "0 2 * *", "61 * * * *", "daily", "  "])
def test_invalid_schedules_name_the_accepted_forms(schedule):
    with pytest.raises(SpecError, match="schedule"):
        spec(schedule=schedule)


def test_none_like_schedules_mean_unscheduled():
    assert normalise_schedule("none") is None
    assert normalise_schedule("") is None
    assert normalise_schedule(" @daily ") == "@daily"


@pytest.mark.parametrize("count", [-1, 1.5, "two", True])
def test_gpu_counts_below_zero_or_not_whole_are_refused(count):
    with pytest.raises(SpecError, match="GPU count"):
        GpuRequest(count=count)


def test_parse_gpus_accepts_numbers_and_all_only():
    assert parse_gpus("2") == 2
    assert parse_gpus("all") == "all"
    with pytest.raises(SpecError, match=">= 0"):
        parse_gpus("-1")
    with pytest.raises(SpecError, match="whole number"):
        parse_gpus("many")


def test_unknown_mig_profile_lists_the_known_ones():
    with pytest.raises(SpecError) as info:
        GpuRequest(mig="9g.999gb")
    assert "1g.10gb" in str(info.value) and "7g.141gb" in str(info.value)


def test_mig_is_one_slice_not_combined_with_a_gpu_count():
    assert GpuRequest(mig="3g.40gb").slots == 1
    with pytest.raises(SpecError, match="one MIG slice"):
        GpuRequest(count=2, mig="3g.40gb")


def test_pool_slots_follow_the_gpu_count_and_never_drop_below_one():
    assert GpuRequest(count=4).slots == 4
    assert GpuRequest(count=0).slots == 1
    assert GpuRequest(count="all").slots == 1


@pytest.mark.parametrize("field,value", [("retries", -1), ("retry_delay_s", "5"),
                                         ("execution_timeout_s", 0), ("start_date", "2025-13-01"),
                                         ("tags", ("",)), ("kernel", "")])
def test_other_settings_are_validated(field, value):
    with pytest.raises(SpecError):
        spec(**{field: value})


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        spec().dag_id = "other"
