"""Malformed requests against every unsafe route of the JSON API, found from its OpenAPI schema:
hypothesis draws path ids, query strings, bodies (valid ones mutated, any JSON, raw bytes, cut
files, multipart uploads) and content types. Every answer is below 500, and a refused request
changes no row and queues no task.

Template import and create are fuzzed in templates_app/tests/test_fuzz.py (600 and 300 inputs)
with template-shaped strategies; this file reuses that file's value strategies."""

from __future__ import annotations

import json
from collections import Counter
from urllib.parse import quote, urlencode

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets_app.models import Dataset, DatasetCredential
from mistudio.api import api
from mistudio.testing.queues import queued_task_payloads, queues_purge
from models_app.models import ExtractionExport, ExtractionJob, HubCredential, Model
from templates_app.models import ExtractionTemplate
from templates_app.tests.helpers import VALID as TEMPLATE
from templates_app.tests.test_fuzz import FUZZ, any_text, edge_text, json_values, numbers, one_in

from .conftest import FIGURES, TEXTS_REPO

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES = 200
UNSAFE = ("post", "put", "patch", "delete")
FUZZED_ELSEWHERE = {("post", "/api/templates/import"), ("post", "/api/templates/extraction")}
TABLES = (Model, HubCredential, ExtractionJob, ExtractionExport, Dataset, DatasetCredential,
          ExtractionTemplate)  # fmt: skip

IDS = {
    "model": ["m_ready", "m_queued", "m_downloading", "m_error"],
    "extraction": ["x_done", "x_queued", "x_running"],
    "dataset": ["d_ready", "d_queued"],
    "template": ["00000000-0000-4000-8000-0000000000aa"],
}
BASES = {
    "/api/models/download": {"hf_repo_id": "tiny/llama", "quantization": "Q4", "revision": "main"},
    "/api/models/{model_id}/extract-activations": {
        "dataset_id": "d_ready",
        "layers": [0],
        "hook_types": ["residual"],
        "batch_size": 2,
        "max_samples": 4,
        "context_size": 16,
    },
    "/api/models/{model_id}/extract-estimate": {
        "layers": [0],
        "hook_types": ["residual"],
        "max_samples": 4,
        "context_size": 16,
        "output_format": "safetensors+saelens",
    },
    "/api/extractions/{extraction_id}/export": {"format": "saelens"},
    "/api/datasets": {"hf_dataset_id": TEXTS_REPO, "split": "train", "text_field": "text"},
    "/api/templates/extraction/{template_id}": TEMPLATE,
    "/api/templates/extraction/{template_id}/favorite": {"is_favorite": True},
    "/api/templates/export": {"ids": IDS["template"]},
}


def unsafe_routes() -> list[tuple[str, str]]:
    paths = api.get_openapi_schema()["paths"]
    found = [(m, p) for p, ops in paths.items() for m in ops if m in UNSAFE]
    return [r for r in found if r not in FUZZED_ELSEWHERE]


def seed() -> None:
    """A known state with rows in every status the routes act on (recreated when a request
    deleted or changed one)."""
    now = timezone.now()
    _models(now)
    _datasets(now)
    ready = Model.objects.get(pk="m_ready")
    for pk, status in (("x_done", "completed"), ("x_queued", "queued"), ("x_running", "running")):
        ExtractionJob.objects.update_or_create(
            pk=pk,
            defaults=dict(
                model=ready, dataset_id="d_ready", layers=[0], hook_types=["residual"],
                batch_size=2, max_samples=4, context_size=16, status=status, heartbeat_at=now,
                cancel_flag=False, output_path=f"/nonexistent/{pk}",
            ),
        )  # fmt: skip
    ExtractionJob.objects.exclude(pk__in=IDS["extraction"]).delete()
    queues_purge()
    ExtractionTemplate.objects.exclude(pk=IDS["template"][0]).delete()
    ExtractionTemplate.objects.update_or_create(pk=IDS["template"][0], defaults=TEMPLATE)


def _models(now) -> None:
    states = {"m_ready": "ready", "m_queued": "queued", "m_downloading": "downloading"}
    states["m_error"] = "error"
    Model.objects.exclude(pk__in=states).delete()
    for pk, status in states.items():
        Model.objects.update_or_create(
            pk=pk,
            defaults=dict(
                name=pk, hf_repo_id=f"tiny/{pk}", quantization="Q4", status=status,
                num_layers=2, hidden_dim=128, max_position=256, heartbeat_at=now,
                cancel_flag=False, is_loaded=False,
            ),
        )  # fmt: skip


def _datasets(now) -> None:
    states = {"d_ready": "ready", "d_queued": "queued"}
    Dataset.objects.exclude(pk__in=states).delete()
    for pk, status in states.items():
        Dataset.objects.update_or_create(
            pk=pk,
            defaults=dict(
                name=pk, source="upload", status=status, heartbeat_at=now, cancel_flag=False
            ),
        )


def snapshot() -> list:
    """Every row of the tables a write route can touch and every task waiting in the broker (ORM
    or Redis); equal snapshots mean nothing changed."""
    rows = [list(t.objects.order_by("pk").values_list()) for t in TABLES]
    return [*rows, [(p["func"], p["args"]) for p in queued_task_payloads()]]


def path_ids() -> st.SearchStrategy[str]:
    """Ids as a URL segment: real ones of every kind, odd text (bytes quoted, lone surrogates
    passed through as invalid UTF-8), empty, long, traversal."""
    real = st.sampled_from([i for ids in IDS.values() for i in ids])
    odd = st.one_of(any_text, edge_text, st.sampled_from(["..", "%", "m_ready/../x", "1" * 500]))
    raw = odd.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe=""))
    return st.one_of(real, real, raw)


def mutated(base: dict) -> st.SearchStrategy[dict]:
    """`base` with some fields replaced by odd values, removed, or new fields added."""
    field_values = st.one_of(json_values, numbers, any_text, edge_text)

    @st.composite
    def build(draw) -> dict:
        body = dict(base)
        for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)):
            if draw(st.booleans()):
                body[key] = draw(field_values)
            else:
                body.pop(key)
        if draw(one_in(6)):
            body[draw(any_text)] = draw(json_values)
        return body

    return build()


def encoded(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def _sendable(text: str) -> str:
    """A browser cannot send a lone surrogate in a form: the client would fail first."""
    return text.encode("utf-8", "replace").decode("utf-8")


def multipart_upload() -> st.SearchStrategy[dict]:
    names = st.sampled_from(["a.txt", "b.jsonl", "c.csv", "d.parquet", "e.exe", "", "x" * 300])
    return st.fixed_dictionaries(
        {
            "name": st.one_of(names, any_text.map(lambda s: _sendable(s) + ".txt")),
            "content": st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"PAR1", b"\n"])),
            "text_field": st.one_of(st.just("text"), edge_text.map(_sendable)),
        }
    )


@st.composite
def requests_for(draw, method: str, path: str) -> dict:
    """One request to `path`: its ids, an optional query, a body and its content type."""
    url = path
    while "{" in url:
        head, _, rest = url.partition("{")
        url = head + draw(path_ids()) + rest.partition("}")[2]
    if draw(one_in(5)):
        query = draw(st.dictionaries(any_text, any_text, max_size=3))
        url += "?" + urlencode(query, encoding="utf-8", errors="surrogatepass")
    kind = draw(st.sampled_from(["mutated"] * 4 + ["json", "bytes", "cut", "form", "multipart"]))
    base = BASES.get(path, {"reason": "none"})
    body = draw(mutated(base)) if kind == "mutated" else draw(json_values)
    data = encoded(body)
    content_type = draw(st.sampled_from(["application/json"] * 4 + ["text/plain", ""]))
    if kind == "bytes":
        data = draw(st.binary(max_size=300))
    elif kind == "cut":
        data = data[: len(data) // 2]
    elif kind == "form":
        data, content_type = urlencode({"x": data}).encode(), "application/x-www-form-urlencoded"
    elif kind == "multipart":
        return {"url": url, "upload": draw(multipart_upload())}
    return {"url": url, "data": data, "content_type": content_type}


def send(client: Client, method: str, req: dict):
    if "upload" in req:
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        return client.generic(method.upper(), req["url"], multipart(**req["upload"]), content_type)
    return client.generic(method.upper(), req["url"], req["data"], req["content_type"])


BOUNDARY = "fuzzBoundary7MA4YWxkTrZu0gW"


def multipart(name: str, content: bytes, text_field: str) -> bytes:
    """A multipart body as a browser writes it (any file name, even an empty one)."""
    filename = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    parts = [
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + content,
        f'Content-Disposition: form-data; name="text_field"\r\n\r\n{text_field}'.encode(),
    ]
    sep = f"--{BOUNDARY}\r\n".encode()
    return b"".join(sep + part + b"\r\n" for part in parts) + f"--{BOUNDARY}--\r\n".encode()


TALLY: Counter = Counter()


@pytest.fixture
def api_client():
    """A client that answers a server error with a 500 instead of raising it (to count them)."""
    return Client(raise_request_exception=False)


@pytest.mark.parametrize("method,path", unsafe_routes())
def test_malformed_requests_never_5xx_and_refusals_change_nothing(
    api_client, hub, texts_repo, method, path
):
    seeded: list = []

    @settings(FUZZ, max_examples=EXAMPLES)
    @given(req=requests_for(method, path))
    def check(req: dict) -> None:
        before = snapshot()
        if before != seeded:  # the last request changed something: start from the seed again
            seed()
            before = seeded[:] = snapshot()
        r = send(api_client, method, req)
        TALLY[(method, path, "tried")] += 1
        TALLY[(method, path, r.status_code // 100)] += 1
        assert r.status_code < 500, (req, r.content[:500])
        if r.status_code >= 400:
            assert snapshot() == before, (req, r.status_code, r.content[:300])

    try:
        check()
    finally:
        connections.close_all()
    tried, errors = TALLY[(method, path, "tried")], TALLY[(method, path, 5)]
    classes = {f"{c}xx": TALLY[(method, path, c)] for c in (2, 4, 5)}
    print(f"fuzz {method.upper()} {path}: {tried} inputs, {classes}")
    FIGURES["API inputs tried (malformed, 200+ per unsafe route)"] += tried
    FIGURES["API 5xx answers"] += errors
    FIGURES["API unsafe routes fuzzed"] += 1
    assert tried >= EXAMPLES and errors == 0


NESTED_BODIES = {
    "brackets": b"[" * 100_000,
    "objects": b'{"a":' * 100_000,
    "closed": b"[" * 5_000 + b"]" * 5_000,
    "in-a-field": b'{"hf_repo_id": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "float-overflow": b'{"hf_repo_id": "tiny/llama", "quantization": "Q4", "x": 1e400}',
    "nan": b'{"hf_repo_id": "tiny/llama", "quantization": NaN}',
}


@pytest.mark.parametrize("kind", sorted(NESTED_BODIES))
def test_deeply_nested_json_is_a_4xx_on_every_json_route(hub, kind):
    """One JSON parser for every route (mistudio.jsonparse): `[` × 100,000 was a 500
    (RecursionError) on POST /api/datasets (issue 13)."""
    seed()
    before = {t.__name__: t.objects.count() for t in TABLES}
    client = Client()
    routes = [(m, p) for m, p in unsafe_routes() if m != "delete"]  # DELETE reads no body
    for method, path in routes:
        concrete = path
        for kind_name, ids in IDS.items():
            concrete = concrete.replace("{" + kind_name + "_id}", ids[0])
        answer = getattr(client, method)(
            concrete, NESTED_BODIES[kind], content_type="application/json"
        )
        assert answer.status_code < 500, (method, concrete, answer.status_code)
    for path in ("/models/download", "/models/estimate", "/datasets/import"):
        answer = client.post(path, NESTED_BODIES[kind], content_type="application/json")
        assert answer.status_code < 500, (path, answer.status_code)
    assert {t.__name__: t.objects.count() for t in TABLES} == before
    FIGURES["deeply nested or non-finite JSON bodies, all < 500"] += len(routes) + 3
