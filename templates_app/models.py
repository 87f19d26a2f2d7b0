"""Extraction templates: a saved extraction configuration (layers, hooks, sizes) to load again."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.db.models.functions import Length
from django.db.models.lookups import Exact, GreaterThan, LessThanOrEqual
from django.utils import timezone

from mistudio import limits

NUMBER_BOUNDS = {
    "max_samples": (limits.MAX_SAMPLES_MIN, limits.MAX_SAMPLES_MAX),
    "batch_size": (limits.BATCH_SIZE_MIN, limits.BATCH_SIZE_MAX),
    "context_size": (limits.CONTEXT_SIZE_MIN, limits.CONTEXT_SIZE_MAX),
    "top_k_examples": (limits.TOP_K_MIN, limits.TOP_K_MAX),
}


def _range(field: str) -> models.CheckConstraint:
    low, high = NUMBER_BOUNDS[field]
    return models.CheckConstraint(
        condition=Q(**{f"{field}__gte": low, f"{field}__lte": high}),
        name=f"extraction_template_{field}_range",
    )


class JSONType(models.Func):
    """The JSON type of a value ('array', 'object', …): json_type on SQLite, jsonb_typeof on
    PostgreSQL."""

    function = "JSON_TYPE"
    output_field = models.CharField()

    def as_postgresql(self, compiler, connection, **extra):
        return super().as_sql(compiler, connection, function="JSONB_TYPEOF", **extra)


def _json_list(field: str, max_items: int) -> models.CheckConstraint:
    # An array (PostgreSQL would read `-> 0` of a scalar as the scalar itself) with a first
    # element and nothing past the bound: array-index lookups compile on both databases.
    return models.CheckConstraint(
        condition=Exact(JSONType(field), "array")
        & Q(**{f"{field}__0__isnull": False, f"{field}__{max_items}__isnull": True}),
        name=f"extraction_template_{field}_list",
    )


class ExtractionTemplate(models.Model):
    """A named extraction configuration. Validation lives in `schemas.TemplateIn`; the constraints
    below are the database's own guard, the same on SQLite and PostgreSQL."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=limits.NAME_MAX, unique=True)
    description = models.CharField(max_length=limits.DESCRIPTION_MAX, blank=True, default="")
    layers = models.JSONField(help_text="Sorted distinct block indices, e.g. [0, 6, 11].")
    hook_types = models.JSONField(
        help_text="A non-empty subset of residual, mlp, attention, resid_pre, z, ln_final."
    )
    module_sites = models.JSONField(
        default=list,
        blank=True,
        help_text='Module paths read as is: [{"path": "model.layers.3.mlp", "io": "output"}].',
    )
    max_samples = models.IntegerField(default=limits.DEFAULT_MAX_SAMPLES)
    batch_size = models.IntegerField(default=limits.DEFAULT_BATCH_SIZE)
    context_size = models.IntegerField(default=limits.DEFAULT_CONTEXT_SIZE)
    top_k_examples = models.IntegerField(default=limits.DEFAULT_TOP_K)
    # Special-token strings in the data: plain text or parsed (limits.SPECIAL_TOKENS)
    special_tokens = models.CharField(
        max_length=8,
        choices=list(limits.SPECIAL_TOKENS_LABELS.items()),
        default=limits.DEFAULT_SPECIAL_TOKENS,
    )
    # What the extraction writes: the shards, or also a SAELens folder (limits.OUTPUT_FORMATS)
    output_format = models.CharField(
        max_length=24,
        choices=list(limits.OUTPUT_FORMAT_LABELS.items()),
        default=limits.DEFAULT_OUTPUT_FORMAT,
    )
    is_favorite = models.BooleanField(default=False, db_index=True)
    # Not auto_now_add: an import restores the exported creation time.
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "extraction_templates"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=GreaterThan(Length("name"), 0)
                & LessThanOrEqual(Length("name"), limits.NAME_MAX),
                name="extraction_template_name_length",
            ),
            models.CheckConstraint(
                condition=LessThanOrEqual(Length("description"), limits.DESCRIPTION_MAX),
                name="extraction_template_description_length",
            ),
            _json_list("layers", limits.LAYERS_PER_JOB_MAX),
            _json_list("hook_types", len(limits.HOOK_TYPES)),
            *(_range(field) for field in NUMBER_BOUNDS),
            models.CheckConstraint(
                condition=Q(special_tokens__in=limits.SPECIAL_TOKENS),
                name="extraction_template_special_tokens_choice",
            ),
            models.CheckConstraint(
                condition=Q(output_format__in=limits.OUTPUT_FORMATS),
                name="extraction_template_output_format_choice",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def extraction_settings(self) -> dict:
        """The fields an extraction request takes from a template."""
        return {
            "layers": list(self.layers),
            "hook_types": list(self.hook_types),
            "module_sites": [dict(site) for site in self.module_sites],
            "batch_size": self.batch_size,
            "max_samples": self.max_samples,
            "context_size": self.context_size,
            "special_tokens": self.special_tokens,
            "output_format": self.output_format,
        }

    @property
    def hooks_display(self) -> str:
        paths = [f"{site['path']} ({site['io']})" for site in self.module_sites]
        return ", ".join([*self.hook_types, *paths])

    @property
    def layers_display(self) -> str:
        return ", ".join(str(i) for i in self.layers)
