"""The web benchmark's page measurement on the test database: it runs and counts queries. No
timing is asserted."""

from __future__ import annotations

import pytest

from benchmarks import web


@pytest.mark.django_db
def test_page_measurements_report_time_and_query_counts_at_10_and_500_rows(settings):
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]

    pages = web.measure_pages(n_requests=1)

    assert pages.keys() == web.PAGES.keys()
    for page in pages.values():
        assert page["median_ms"] > 0 and page["bytes"] > 0
        assert page["queries_10"] > 0 and page["queries_500"] > 0


def test_the_delay_summary_is_in_milliseconds():
    summary = web._delay_summary([10.0, 20.0, 30.0, 400.0])

    assert summary == {"median_ms": 25.0, "p95_ms": 400.0, "max_ms": 400.0, "samples": 4}
