"""Suite-wide settings. Service fixtures live in tests/integration/conftest.py."""

from hypothesis import HealthCheck, settings

# Two cores shared with Kafka and OpenSearch: wall-clock limits would make property tests
# flaky without making them stronger, so deadlines and the slow-generation check are off.
settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    max_examples=100,
)
settings.load_profile("default")
