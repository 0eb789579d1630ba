import pytest

from tests.helpers import exported, rng  # noqa: F401  (fixtures)

# Tests the emulated-ARM job (.ci/arm.sh test) leaves out, by node id, each with the reason.
# They get the marker `slow_under_emulation` here, so the job leaves them out with one -m
# expression and `pytest -m slow_under_emulation --collect-only` lists them; natively they run
# as usual. tests/test_ci_config.py checks that every entry still names a test.
SLOW_UNDER_EMULATION = {
    "tests/runtime/test_buffer.py::test_every_example_is_kept_with_probability_capacity_over_seen":
        "3.5 min emulated (300 reservoir runs in Python); seeded numpy arithmetic, the same on every platform",
    "tests/runtime/test_buffer.py::test_first_examples_are_not_favoured_or_penalised":
        "2.5 min emulated (20 000 reservoir runs in Python); seeded numpy arithmetic, the same on every platform",
    "tests/runtime/test_buffer.py::test_sample_is_uniform_without_replacement":
        "40 s emulated (4 000 samples in Python); seeded numpy arithmetic, the same on every platform",
    "tests/runtime/test_flops.py::test_property_a_sparser_config_never_has_more_flops":
        "2 min emulated (hypothesis, FLOP counting in Python floats); nothing platform-specific",
    "tests/runtime/test_checkpoint.py::test_sigkill_at_random_moments_never_leaves_an_unloadable_root":
        "gives itself 15 s of kills, and an emulated child takes ~5 s to start: too few kills to judge",
    "tests/runtime/test_loop.py::test_permuted_digits_is_domain_incremental":
        "4 min emulated; the loop trains on aarch64 in test_der_plus_plus_beats_fine_tuning_… and the agent tests",
    "tests/runtime/test_loop.py::test_a_resume_under_other_settings_is_refused_naming_each_field_and_changes_nothing":
        "8 cases, each trains a run first (1.3 s each natively); the settings check is JSON, nothing platform-specific "
        "(test_jobs.py's refusal through the agent runs emulated)",
    "tests/runtime/test_loop.py::test_an_edited_meta_json_falls_back_to_the_older_checkpoint":
        "3 runs (2.4 s each natively); checkpoint files and JSON, nothing platform-specific",
    "tests/runtime/test_loop.py::test_a_position_this_run_cannot_be_at_falls_back_too":
        "10 runs (1.3-1.7 s each natively); validation of a JSON position, nothing platform-specific",
    "tests/runtime/test_loop.py::test_another_checkpoint_cadence_resumes_the_same_run":
        "two runs (1.6 s natively); test_a_resumed_run_ends_with_the_uninterrupted_metrics resumes emulated",
    "tests/runtime/test_loop.py::test_other_data_under_the_same_name_is_refused":
        "two runs natively ~1 s; a sha256 over the data, nothing platform-specific",
    "tests/runtime/test_loop.py::test_sparcl_keeps_exact_sparsity_and_counts_fewer_flops":
        "2.5 min emulated; SparCL-DER++ trains on aarch64 in test_agent_e2e.py::test_training_survives_an_agent_restart",
    "tests/examples/test_stream_app.py::test_the_app_survives_sigkill_and_ends_as_an_uninterrupted_run":
        "4.1 min emulated (an app process per kill, ~5 s to start under qemu); the OnlineLearner under it is "
        "killed and reopened emulated in test_online_kill.py::test_sigkill_at_random_moments_…",
    "tests/runtime/test_online_kill.py::test_sigkill_at_each_durable_write_of_a_save_then_reopen_equals_an_uninterrupted_run":
        "2.9 min emulated (a process per durable write); which writes a save makes is Python and os calls, "
        "nothing architecture-specific, and the random-moment kills of the same file run emulated",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = SLOW_UNDER_EMULATION.get(item.nodeid.split("[")[0])
        if reason is not None:
            item.add_marker(pytest.mark.slow_under_emulation(reason=reason))
