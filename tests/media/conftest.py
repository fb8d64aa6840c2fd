"""Makes the media I/O fixtures (tests/media/fixtures.py) available to every test in tests/media."""

from tests.media.fixtures import engine_url, speech_8k  # noqa: F401
