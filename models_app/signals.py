"""Worker start-up: end stale jobs, requeue lost ones; a fresh GPU worker holds no model."""

from __future__ import annotations

import logging

from django.conf import settings
from django.dispatch import receiver
from django_q.conf import Conf
from django_q.signals import post_spawn

from . import reconcile, resident

log = logging.getLogger(__name__)


@receiver(post_spawn)
def worker_started(sender, proc_name: str, **kwargs) -> None:
    try:
        if Conf.CLUSTER_NAME == settings.GPU_CLUSTER:
            resident.cache_reset()
        reconcile.worker_start(Conf.CLUSTER_NAME)
        if Conf.CLUSTER_NAME == settings.DOWNLOAD_CLUSTER:
            reconcile.schedule_ensure()
    except Exception:  # noqa: BLE001 - an exception here would kill every new worker, forever
        log.exception("start-up reconciliation failed; the periodic reconciler will retry")
