"""Device profiles: built-in boards from datasheets, the measured host, user TOML files, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from edgecl.devices.profiles import (FIGURES, DeviceProfile, Figure, Provenance, all_profiles, builtin_profiles,
                                     find_profile, host_profile, load_profile, probe_host, save_profile)

BUILTINS = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano-cpu", "jetson-orin-nano-gpu",
            "snapdragon-8-gen-2-cpu"}

USER_TOML = '''
name = "my-board"
description = "a board of mine"
arch = "riscv64"
kind = "cpu"

[cores]
value = 4
source = "datasheet"
reference = "vendor sheet"

[ram_bytes]
value = 2147483648
source = "datasheet"

[peak_gflops]
value = 12.5
source = "measured"
reference = "my own sgemm run"

[bandwidth_gbps]
value = 6.4
source = "datasheet"
'''


@pytest.fixture(scope="module")
def host():
    # a short probe: the figures are real measurements, just over fewer repeats
    return probe_host(threads=1, seconds=0.05, matmul_n=128, copy_mib=8)


def test_builtins_are_datasheet_figures_with_a_named_source():
    profiles = builtin_profiles()
    assert set(profiles) == BUILTINS
    for p in profiles.values():
        assert not p.measured
        for key in FIGURES:
            fig = getattr(p, key)
            assert fig.source is Provenance.DATASHEET and fig.value > 0 and len(fig.reference) > 10, (p.name, key)
    assert profiles["jetson-orin-nano-gpu"].kind.value == "gpu"
    assert profiles["raspberry-pi-5"].peak_gflops.value > profiles["raspberry-pi-4"].peak_gflops.value


def test_round_trip_dict_and_toml(tmp_path):
    for p in builtin_profiles().values():
        assert DeviceProfile.from_dict(p.to_dict()) == p
        assert load_profile(save_profile(p, tmp_path / f"{p.name}.toml")) == p


def test_host_probe_is_measured_and_round_trips(host, tmp_path):
    assert host.name == "host" and host.measured
    assert all(getattr(host, k).source is Provenance.MEASURED for k in FIGURES)
    assert host.peak_gflops.value > 0 and host.bandwidth_gbps.value > 0 and host.cores.value >= 1
    assert "128x128 matmul" in host.peak_gflops.reference and "1 BLAS threads" in host.peak_gflops.reference
    assert load_profile(save_profile(host, tmp_path / "h.toml")) == host


def test_host_profile_cache(tmp_path, host, monkeypatch):
    import edgecl.devices.profiles as profiles

    calls = []
    monkeypatch.setattr(profiles, "probe_host", lambda threads: calls.append(threads) or host)  # count probes only
    cache = tmp_path / "cache" / "host.toml"
    assert host_profile(cache, threads=3) == host and calls == [3] and cache.is_file()
    assert host_profile(cache) == host and calls == [3]            # read back, no new probe
    host_profile(cache, probe=True)
    assert calls == [3, 2]                                        # --probe measures again


def test_user_profile_loads_and_joins_or_replaces(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(USER_TOML)
    mine = load_profile(path)
    assert mine.peak_gflops == Figure(12.5, "measured", "my own sgemm run") and mine.ram_bytes.reference == ""
    assert not mine.measured  # mixed provenance: not all measured
    profiles = all_profiles([path])
    assert list(profiles)[-1] == "my-board" and BUILTINS <= set(profiles)
    replaced = tmp_path / "pi4.toml"
    replaced.write_text(USER_TOML.replace('"my-board"', '"raspberry-pi-4"'))
    assert all_profiles([replaced])["raspberry-pi-4"].arch == "riscv64"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("[peak_gflops]\nvalue = 12.5\n", "[peak_gflops]\n"), r"\[peak_gflops\] lacks key\(s\) \['value'\]"),
    (lambda t: t.split("[bandwidth_gbps]")[0], r"lacks key\(s\) \['bandwidth_gbps'\]"),
    (lambda t: t.replace('arch = "riscv64"\n', ""), r"lacks key\(s\) \['arch'\]"),
    (lambda t: t.replace("value = 6.4", "value = -6.4"), r"\[bandwidth_gbps\] figure value=-6.4; accepted: a finite number > 0"),
    (lambda t: t.replace('source = "measured"', 'source = "guessed"'), r"source='guessed'; accepted: measured, datasheet"),
    (lambda t: t.replace('kind = "cpu"', 'kind = "npu"'), r"kind='npu'; accepted: cpu, gpu"),
    (lambda t: t + "\nclock_ghz = 2\n", r"unknown key\(s\) \['clock_ghz'\]"),
    (lambda t: t.replace('name = "my-board"', 'name = "My Board"'), r"profile name='My Board'"),
    (lambda t: t.replace("value = 4\n", "value = 4 4\n"), "is not valid TOML"),
])
def test_bad_profile_files_name_the_problem(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(USER_TOML))
    with pytest.raises(ValueError, match=message):
        load_profile(path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="'pi-9' is unknown; accepted: .*raspberry-pi-4.*host"):
        find_profile("pi-9", builtin_profiles())


def test_probe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threads=0"):
        probe_host(threads=0)
    with pytest.raises(ValueError, match="seconds=0"):
        probe_host(seconds=0)


def test_profiles_are_frozen():
    p = builtin_profiles()["raspberry-pi-4"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "x"
