"""The pytest plugin, used the way a user's suite would use it."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_batched_text_poke_bp_with_nested_safe_nmis_is_safe(textpoke_scenario, assert_safe):
    outcome = textpoke_scenario(protocol="bp-batch", nmi="nested-safe", nmi_rate=300, seed=11)
    assert_safe(outcome)
    assert outcome.verdict.accounting["exact"]


def test_scenario_kwargs_take_the_xmc_rule_and_the_nmi_cpus(textpoke_scenario):
    outcome = textpoke_scenario(protocol="bp-batch", sites=2, xmc_rule="sdm", nmi_cpus="workers", seed=1)
    assert set(outcome.verdict.failed_classes) == {"unsynced-modification"}


def test_machine_and_patcher_fixtures(textpoke_machine, textpoke_patcher, textpoke_kernel):
    m = textpoke_machine(cpus=3, seed=5)
    p = textpoke_patcher(m)
    m.run(2_000)
    report = p.enable_ftrace([textpoke_kernel.site_of(4)], protocol="bp")
    assert len(report.syncs) == 3
    assert m.read(textpoke_kernel.site_of(4), 1) == b"\xe8"
    assert not m.oracle.counts


def test_assert_safe_shows_the_replay_command_and_the_trace(pytester):
    """A user's failing test prints what they need to reproduce the failure."""
    pytester.makepyfile(
        """
        def test_unsafe(textpoke_scenario, assert_safe):
            assert_safe(textpoke_scenario(protocol="naive-atomic", sites=4, seed=3))
        """
    )
    result = pytester.runpytest_subprocess()  # the plugin comes from the installed entry point
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "textpoke replay 3 --protocol naive-atomic" in out
    assert "trace around the first violation" in out
    assert "!!" in out
