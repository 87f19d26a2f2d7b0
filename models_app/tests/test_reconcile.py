"""The periodic reconciler's schedule: one row whatever the number of starting workers, its
period from MISTUDIO_RECONCILE_MINUTES, none when that is 0."""

from __future__ import annotations

import pytest
from django_q.models import Schedule

from models_app.reconcile import SCHEDULE_NAME, schedule_ensure

pytestmark = pytest.mark.django_db


def test_one_schedule_at_the_configured_period(settings):
    settings.RECONCILE_MINUTES = 3
    Schedule.objects.create(name=SCHEDULE_NAME, func="x", schedule_type=Schedule.MINUTES)
    Schedule.objects.create(name=SCHEDULE_NAME, func="x", schedule_type=Schedule.MINUTES)
    schedule_ensure()
    schedule_ensure()
    rows = list(Schedule.objects.filter(name=SCHEDULE_NAME).values_list("func", "minutes"))
    assert rows == [("models_app.tasks.reconcile_task", 3)]


def test_zero_minutes_means_no_periodic_reconciler(settings):
    schedule_ensure()
    assert Schedule.objects.filter(name=SCHEDULE_NAME).count() == 1
    settings.RECONCILE_MINUTES = 0
    schedule_ensure()
    assert not Schedule.objects.filter(name=SCHEDULE_NAME).exists()
