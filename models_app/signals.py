"""Worker start-up: reconcile stale jobs, and a fresh GPU worker holds no model."""

from __future__ import annotations

import logging

from django.conf import settings
from django.dispatch import receiver
from django_q.signals import post_spawn

log = logging.getLogger(__name__)


@receiver(post_spawn)
def worker_started(sender, proc_name: str, **kwargs) -> None:
    from django_q.conf import Conf

    from . import reconcile, resident

    reconcile.reconcile_all()
    if Conf.CLUSTER_NAME == settings.DOWNLOAD_CLUSTER:
        reconcile.schedule_ensure()
    if Conf.CLUSTER_NAME == settings.GPU_CLUSTER:
        resident.cache_reset()
