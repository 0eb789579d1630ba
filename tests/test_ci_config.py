"""The test set-up of CI: the emulated-ARM job's exclusions and fixtures name things that exist."""

from __future__ import annotations

import importlib

from tests.conftest import SLOW_UNDER_EMULATION
from tests.helpers import FIXTURES, fixture_dirname, fixture_key


def test_every_emulation_exclusion_names_an_existing_test():
    for node_id, reason in SLOW_UNDER_EMULATION.items():
        path, _, name = node_id.partition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), f"{node_id} is gone: update tests/conftest.py"
        assert reason.strip()


def test_fixture_keys_are_normalised_and_their_folders_distinct():
    assert all(fixture_key(*key) == key for key in FIXTURES)
    assert len({fixture_dirname(key) for key in FIXTURES}) == len(FIXTURES)
    assert fixture_dirname(fixture_key("cnn", masks=["b", "a"], trainable={"y", "x"})) == "cnn--portable--b+a--x+y"
