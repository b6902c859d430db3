"""Fixtures shared by the unit and end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway_tools.dev.s3_server import S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API on a loopback port, for the whole session (started on first use).

    A test may stop() it to play an outage; it must start() it again (buckets survive).
    """
    with S3Server() as server:
        yield server
