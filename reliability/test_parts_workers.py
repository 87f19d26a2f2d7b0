"""One extraction across two and three GPU-worker processes (each bound to an indexed CPU
device), a worker killed with kill -9 at random points, and every process restarted mid-job.

The output is compared with a one-worker run of the same request (ml/extract.run_extraction, the
uninterrupted loop), and a shard with plain transformers' own hidden states. Moments are found
by observed progress (a part's tokens done), never by a guess of the machine's speed."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from datasets_app.services import dataset_texts
from mistudio.testing.live import LiveStack
from mistudio.testing.queues import queues_purge
from models_app import extraction
from models_app.extraction import extraction_spec, model_tokenizer
from models_app.ml.extract import run_extraction
from models_app.ml.loading import load_model
from models_app.models import ExtractionJob, ExtractionPart
from models_app.tests.helpers import download, wait_for
from models_app.tests.ml.same_output import assert_same_output

from .conftest import figure_max
from .helpers import (
    DEADLINE_S,
    EXTRACTION_TERMINAL,
    LiveClient,
    big_dataset,
    crash_recorded,
    kill_pid,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SHARD_KB = 66  # tiny/llama at T=16: 8 sequences per shard, a multiple of the batch size
ENV = {
    "MISTUDIO_STALE_HEARTBEAT_S": "5",
    "MISTUDIO_RECONCILE_MINUTES": "0",
    "MISTUDIO_TASK_TIMEOUT": "1800",
    "MISTUDIO_TASK_RETRY_S": "3600",
    "MISTUDIO_SHARD_KB": str(SHARD_KB),
    "MISTUDIO_EXTRACTION_PARTS": "6",
    "OMP_NUM_THREADS": "1",
}
REQUEST = {"layers": [0, 1], "hook_types": ["residual"], "batch_size": 2, "max_samples": 1200,
           "context_size": 16}  # fmt: skip  # 150 shards, 600 batches, 6 parts


@pytest.fixture
def stack(hub, transactional_db, settings):
    settings.EXTRACTION_SHARD_BYTES = SHARD_KB * 1024  # the reference run's shards too
    queues_purge()
    with LiveStack(hub.endpoint, extra_env=ENV, clusters=False) as live:
        yield live
        for name in list(live.procs):
            live.kill(name)


def _workers(live, n: int) -> list[str]:
    names = [live.start_worker(f"cpu:{i}") for i in range(n)]
    for name in names:  # every worker is up before the job starts
        log = live.log_dir / f"{name}.log"
        wait_for(lambda log=log: log.exists() and b"ready for work" in log.read_bytes(),
                 timeout=DEADLINE_S, every=0.1)  # fmt: skip
    return names


def _start(model, dataset) -> ExtractionJob:
    return extraction.extraction_start(model_id=model.pk, dataset_id=dataset.pk, **REQUEST)


def _ended(job_id: str) -> ExtractionJob:
    done = ExtractionJob.objects.filter(pk=job_id, status__in=EXTRACTION_TERMINAL)
    return wait_for(lambda: done.first(), timeout=DEADLINE_S * 2, every=0.1)


def _reference(job: ExtractionJob, out: Path) -> None:
    """The same request run by one worker without parts: the uninterrupted loop."""
    row = job.model
    model, _ = load_model(row.local_path, row.quantization, torch.device("cpu"))
    run_extraction(model, model_tokenizer(row.local_path), dataset_texts(job.dataset_id),
                   extraction_spec(job), out, meta={})  # fmt: skip


def _assert_complete_and_clean(job: ExtractionJob, tmp_path: Path) -> None:
    assert job.status == "completed", job.error_message
    out = Path(job.output_path)
    _reference(job, tmp_path / "one")
    assert_same_output(tmp_path / "one", out)  # token ids, sha256s, statistics
    listed = {s["file"] for h in job.manifest["hooks"] for s in h["shards"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.json"}  # nothing duplicated, missing or partial
    hook = job.manifest["hooks"][0]  # blocks.0.hook_resid_post against plain transformers
    last = load_file(out / hook["shards"][-1]["file"])
    ref = hidden_states_of(job.model.local_path, last["token_ids"])[1]
    torch.testing.assert_close(last["activations"], ref, rtol=1e-4, atol=1e-4)


def hidden_states_of(local_path: str, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Plain transformers' own hidden states (no hooks of ours) of token ids (n, T)."""
    ref = AutoModelForCausalLM.from_pretrained(local_path, dtype=torch.float32)
    with torch.no_grad():
        return ref(ids.long(), output_hidden_states=True).hidden_states


def _clean_batches(part: ExtractionPart, job: ExtractionJob) -> int:
    """Batches of one uninterrupted run of the part."""
    S, B = job.manifest["shard_sequences"], job.batch_size
    shards = job.manifest["hooks"][0]["shards"][part.shard_start : part.shard_end]
    assert len(shards) == part.n_shards and all(s["n_seq"] <= S for s in shards)
    return sum(math.ceil(s["n_seq"] / B) for s in shards)


@pytest.mark.parametrize("n_workers", [2, 3])
def test_workers_share_an_extraction_and_write_what_one_worker_writes(
    stack, hub, tmp_path, n_workers
):
    model, dataset = download("tiny/llama", "FP16"), big_dataset()
    _workers(stack, n_workers)
    started = time.monotonic()
    job = _ended(_start(model, dataset).pk)
    figure_max(
        f"seconds for the test extraction on {n_workers} workers", time.monotonic() - started
    )
    parts = list(job.parts.all())
    assert [p.status for p in parts] == ["completed"] * 6
    assert len({p.device for p in parts}) >= 2, [(p.index, p.device) for p in parts]
    assert all(p.batches == _clean_batches(p, job) for p in parts)  # nothing done twice
    _assert_complete_and_clean(job, tmp_path)


def _shown_while_running(live, job_id: str) -> None:
    """The API record lists the parts with device, state and shards done; the model's card
    shows each part's worker."""
    web = LiveClient(live.url)
    try:
        record = web.get(f"/api/extractions/{job_id}").json()
        parts = record["parts"]
        assert [p["index"] for p in parts] == list(range(6))
        assert {p["status"] for p in parts} <= {"queued", "running", "completed"}
        assert any(p["status"] == "running" and p["device"].startswith("cpu:") for p in parts)
        assert all(0 <= p["shards_done"] <= p["shard_end"] - p["shard_start"] for p in parts)
        page = web.get("/models/").text
        assert 'class="extraction-parts' in page and page.count("data-part=") == 6
    finally:
        web.close()


def _kill_mid_part(live, job_id: str, rng: random.Random, dead: set[str]) -> list[dict]:
    """Wait until a part that never crashed has done a random share of its tokens, kill -9 its
    worker process; returns what the part the dead process held (that one, or the next it took
    if it finished it in the meantime) had done, read after the kill (it cannot change).
    `dead` holds the workers killed before: their parts stay "running" with no crash counted
    until their heartbeat goes stale and a live worker takes them, so they are never chosen."""
    share = rng.uniform(0.05, 0.9)

    def target():
        job = ExtractionJob.objects.get(pk=job_id)
        assert job.status in ("queued", "running"), (job.status, job.error_message, live.logs())
        running = job.parts.filter(status="running", crashes=0).exclude(worker__in=dead)
        return next((p for p in running if p.tokens_done >= share * p.tokens_total), None)

    running = ExtractionPart.objects.filter(extraction_id=job_id, status="running")
    wait_for(running.exists, timeout=DEADLINE_S, every=0.01)
    _shown_while_running(live, job_id)  # before the choice: its requests take a while, in which
    # the chosen part could end and its worker take the part an earlier kill left to resume
    part = wait_for(target, timeout=DEADLINE_S, every=0.01)
    kill_pid(int(part.worker.rsplit(":", 1)[1]))
    dead.add(part.worker)
    crash_recorded(stuck=0)
    held = ExtractionPart.objects.filter(extraction_id=job_id, worker=part.worker, status="running")
    return list(held.values("pk", "tokens_done", "shards_done"))


@pytest.mark.parametrize("seed", [1, 2])
def test_a_worker_killed_mid_part_is_resumed_from_its_last_finished_shard(stack, hub, tmp_path,
                                                                         seed):  # fmt: skip
    rng = random.Random(seed)
    model, dataset = download("tiny/llama", "FP16"), big_dataset()
    _workers(stack, 2)
    job_id = _start(model, dataset).pk
    dead: set[str] = set()
    kills = [_kill_mid_part(stack, job_id, rng, dead) for _ in range(2)]
    job = _ended(job_id)
    _assert_complete_and_clean(job, tmp_path)
    S, T, B = job.manifest["shard_sequences"], job.context_size, job.batch_size
    killed = [held for kill in kills for held in kill]
    assert killed  # a kill hits an idle worker only when no part is left for it
    for kill in killed:
        part = ExtractionPart.objects.get(pk=kill["pk"])
        assert (part.status, part.crashes) == ("completed", 1) and part.attempts >= 2
        # every shard finished before the kill was kept (verified by sha256), none redone: a
        # part started again from zero would count the shards before the kill twice. (A kill
        # between a shard's record on disk and its count in the row misses one shard's count.)
        clean = _clean_batches(part, job)
        assert clean - math.ceil(S / B) <= part.batches <= clean, (part.batches, clean)
        # work lost: the batches of the unfinished shard (progress is written every 0.5 s, so
        # this is what the last write saw)
        lost = max(0, kill["tokens_done"] - kill["shards_done"] * S * T) // T  # sequences
        assert lost <= S
        figure_max("batches recomputed after a kill (max, at the last progress write)",
                   math.ceil(lost / B))  # fmt: skip


def test_every_process_restarted_mid_job_resumes_the_extraction(stack, hub, tmp_path):
    model, dataset = download("tiny/llama", "FP16"), big_dataset()
    names = _workers(stack, 2)
    job_id = _start(model, dataset).pk
    wait_for(lambda: ExtractionJob.objects.get(pk=job_id).progress >= 30, timeout=DEADLINE_S)
    for name in list(stack.procs):
        stack.kill(name)  # kill -9 of every process group: web and both workers
    crash_recorded(stuck=0)
    assert ExtractionJob.objects.get(pk=job_id).status == "running"
    stack.__enter__()  # the web server again
    for i, _name in enumerate(names):
        stack.start_worker(f"cpu:{i}")
    job = _ended(job_id)
    _assert_complete_and_clean(job, tmp_path)
    assert sum(p.crashes for p in job.parts.all()) >= 1
