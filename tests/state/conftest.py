"""Make the state fixtures (tests/state/fixtures.py) available to this area's tests."""

from tests.state.fixtures import (  # noqa: F401
    migrated_database_url,
    migrated_fresh_database_url,
    own_redis,
    seeded_persona,
    state_settings,
)
