"""Property-based fuzzing of the import and create endpoints (and the modal's save form): any
input gets a 2xx or a 4xx, never a 5xx, and an input that is refused changes no row.

Counts of the inputs tried and of 5xx answers are printed (run with -rA to see them)."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from templates_app.models import ExtractionTemplate

from .helpers import VALID, make, send, snapshot

pytestmark = pytest.mark.django_db(transaction=True)

IMPORT_EXAMPLES = 600
CREATE_EXAMPLES = 300
FORM_EXAMPLES = 120
FUZZ = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
SEEDED_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
SEEDED_NAME = "seeded"


def one_in(n: int):
    """True about once in n draws (st.integers would lean on its bounds)."""
    return st.sampled_from([False] * (n - 1) + [True])


# Any character, lone surrogates and NUL included (json.dumps escapes them as \\uXXXX).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
edge_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\ud800",
        "x" * 256,
        "d" * 501,
        "名前",
        "line\nbreak",
        "\u202e",
        SEEDED_NAME,
        "residual",
        "1",
        "true",
    ]
)
numbers = st.one_of(
    st.integers(),
    st.integers(-3, 1100),
    st.sampled_from([0, 1, 2, 1023, 1024, 2**31, 2**63, -1, 10**30, 100_000_000, 131_072]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
stamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(
        [
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "2026-01-01T00:00:00",
            "2026-02-30T00:00:00Z",
            "now",
            "2026-01-01T00:00:00Z",
        ]
    ),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text, edge_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=5),
    max_leaves=15,
)
layer_lists = st.one_of(
    st.lists(st.integers(0, 1023), max_size=8),
    st.lists(numbers, max_size=6),
    st.just(list(range(257))),
    json_values,
)
hook_lists = st.one_of(
    st.lists(st.sampled_from(["residual", "mlp", "attention"]), max_size=5),
    st.lists(st.one_of(edge_text, any_text), max_size=4),
    json_values,
)
FIELD_VALUES = {
    "name": st.one_of(any_text, edge_text, json_values),
    "description": st.one_of(any_text, edge_text, json_values),
    "layers": layer_lists,
    "hook_types": hook_lists,
    "max_samples": st.one_of(numbers, json_values),
    "batch_size": st.one_of(numbers, json_values),
    "context_size": st.one_of(numbers, json_values),
    "top_k_examples": st.one_of(numbers, json_values),
    "is_favorite": st.one_of(st.booleans(), json_values),
    "id": st.one_of(st.uuids().map(str), st.just(str(SEEDED_ID)), any_text, json_values),
    "created_at": st.one_of(stamps, json_values),
    "updated_at": st.one_of(stamps, json_values),
}


@st.composite
def templates(draw, extra_keys=("id", "created_at", "updated_at")) -> dict:
    """A valid template with some fields replaced, removed or added."""
    clash = draw(one_in(4))
    name = draw(st.sampled_from(["n1", SEEDED_NAME])) if clash else f"t{draw(st.uuids()).hex}"
    base = {**VALID, "name": name}
    if draw(one_in(3)):  # odd but maybe valid text: NUL, surrogates, bidi marks, long names
        base[draw(st.sampled_from(["name", "description"]))] = draw(st.one_of(any_text, edge_text))
    for key in draw(st.lists(st.sampled_from([*FIELD_VALUES, *extra_keys]), max_size=3)):
        if key in FIELD_VALUES and draw(st.booleans()):
            base[key] = draw(FIELD_VALUES[key])
        else:
            base.pop(key, None)
    if draw(one_in(10)):
        base[draw(any_text)] = draw(json_values)
    return base


@st.composite
def export_files(draw) -> dict | list:
    kind = draw(st.sampled_from(["file"] * 8 + ["keys"] + ["any"]))
    if kind == "any":
        return draw(json_values)
    items = draw(st.lists(st.one_of(templates(), templates(), json_values), max_size=6))
    sane = not draw(one_in(5))  # mostly a well-formed envelope, so the items get tested
    envelope = {
        "version": 1 if sane else draw(json_values),
        "exported_at": "2026-01-01T00:00:00Z" if sane else draw(st.one_of(stamps, json_values)),
        "extraction_templates": items,
    }
    if kind == "keys":
        for key in draw(st.lists(st.sampled_from(list(envelope)), max_size=3)):
            envelope.pop(key, None)
    if kind == "keys" and draw(st.booleans()):
        envelope[draw(any_text)] = draw(json_values)
    return envelope


def encoded(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def bodies(draw) -> bytes:
    """Mostly JSON files; one in ten random bytes, one in ten a file cut in half."""
    kind = draw(st.sampled_from(["file"] * 8 + ["bytes", "cut"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    body = encoded(draw(export_files()))
    return body[: len(body) // 2] if kind == "cut" else body


conflict_modes = st.sampled_from(["", "skip", "rename", "overwrite"] * 3 + ["merge", "SKIP", "\0"])

TALLY: Counter = Counter()


def seed() -> None:
    """A small known state, reset when the fuzz has grown it, so clashes stay likely."""
    if ExtractionTemplate.objects.count() > 30 or not ExtractionTemplate.objects.exists():
        ExtractionTemplate.objects.all().delete()
        row = make(SEEDED_NAME)
        ExtractionTemplate.objects.filter(pk=row.pk).update(id=SEEDED_ID)
        make("n1")


def record(kind: str, status: int) -> None:
    TALLY[f"{kind} inputs"] += 1
    TALLY[f"{kind} status {status}"] += 1
    if status >= 500:
        TALLY[f"{kind} 5xx"] += 1


def report(kind: str, examples: int) -> None:
    tried, errors = TALLY[f"{kind} inputs"], TALLY[f"{kind} 5xx"]
    statuses = {k.rsplit(" ", 1)[1]: v for k, v in TALLY.items() if k.startswith(f"{kind} status")}
    print(f"fuzz {kind}: {tried} inputs tried, {errors} 5xx, by status {statuses}")
    assert errors == 0 and tried >= examples


def test_fuzz_import_never_5xx_and_refusals_change_nothing(api):
    @settings(FUZZ, max_examples=IMPORT_EXAMPLES)
    @given(body=bodies(), mode=conflict_modes)
    def check(body: bytes, mode: str) -> None:
        seed()
        before = snapshot()
        query = f"?on_conflict={mode}" if mode else ""
        r = send(api, "post", f"/api/templates/import{query}", body)
        record("import", r.status_code)
        assert r.status_code < 500, r.content[:500]
        if r.status_code >= 400:
            assert r.json()["detail"] and snapshot() == before
            return
        result = r.json()
        TALLY["import items imported"] += result["imported"]["extraction_templates"]
        total = len(json.loads(body)["extraction_templates"])
        done = (
            result["imported"]["extraction_templates"] + result["skipped"]["extraction_templates"]
        )
        assert done + len(result["errors"]) == total
        if result["imported"]["extraction_templates"] == 0:
            assert snapshot() == before

    check()
    report("import", IMPORT_EXAMPLES)


def test_fuzz_create_never_5xx_and_refusals_change_nothing(api):
    create_bodies = st.one_of(
        templates(extra_keys=()).map(encoded),
        templates(extra_keys=()).map(encoded),
        json_values.map(encoded),
        st.binary(max_size=100),
    )

    @settings(FUZZ, max_examples=CREATE_EXAMPLES)
    @given(body=create_bodies)
    def check(body: bytes) -> None:
        seed()
        before = snapshot()
        r = send(api, "post", "/api/templates/extraction", body)
        record("create", r.status_code)
        assert r.status_code in (201, 400, 409, 422), (r.status_code, r.content[:500])
        assert r.json()
        if r.status_code == 201:
            assert len(snapshot()) == len(before) + 1
            assert ExtractionTemplate.objects.filter(pk=r.json()["id"]).exists()
        else:
            assert r.json()["detail"] and snapshot() == before

    check()
    report("create", CREATE_EXAMPLES)


def form_values(value) -> list[str]:
    # A browser cannot send a lone surrogate: the client would fail before the server sees it.
    def text(v) -> str:
        return str(v).encode("utf-8", "replace").decode("utf-8")

    return [text(v) for v in value] if isinstance(value, list) else [text(value)]


def test_fuzz_the_modal_save_form(api):
    @settings(FUZZ, max_examples=FORM_EXAMPLES)
    @given(fields=templates(extra_keys=()))
    def check(fields: dict) -> None:
        seed()
        before = snapshot()
        data = {form_values(k)[0]: form_values(v) for k, v in fields.items() if k}
        r = api.post(reverse("templates:save"), data, HTTP_HX_REQUEST="true")
        record("save form", r.status_code)
        assert r.status_code in (201, 400, 409, 422), r.content[:500]
        if r.status_code != 201:
            assert r["HX-Retarget"] == "#templates-error" and snapshot() == before

    check()
    report("save form", FORM_EXAMPLES)
