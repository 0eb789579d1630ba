from tests.helpers import exported, rng  # noqa: F401  (fixtures)
