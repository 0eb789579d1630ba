import pytest


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """One export folder for the whole session (bench latency and memory tests): exports take seconds."""
    return tmp_path_factory.getbasetemp() / "bench-exports"
