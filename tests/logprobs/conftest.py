"""The log-prob tests run every case under both backends."""
import pytest

from tests.helpers import BACKENDS, device_for


@pytest.fixture(params=BACKENDS)
def backend(request, force_backend):
    """Forces the backend and makes its device the default for tensor factories during the test."""
    force_backend(request.param)
    with device_for(request.param):
        yield request.param
