"""Admin curation of extraction templates: search, favourite filter, export / duplicate / toggle
favourite actions and an import page. Edits are checked by the same schema as the API."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path
from pydantic import ValidationError as PydanticValidationError

from mistudio.errors import ServiceError

from . import services
from .models import ExtractionTemplate
from .schemas import ON_CONFLICT, ON_CONFLICT_LABELS, TemplateIn, errors_message
from .views import export_response

SETTINGS = list(TemplateIn.model_fields)
LIST_FIELDS = ("layers", "hook_types", "module_sites")
MAX_ERROR_MESSAGES = 20


class TemplateAdminForm(forms.ModelForm):
    class Meta:
        model = ExtractionTemplate
        fields = SETTINGS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in LIST_FIELDS:  # an empty list gets the schema's message, not "required"
            self.fields[name].required = False
        self.fields["special_tokens"].required = False  # left out: the schema's default
        self.fields["output_format"].required = False

    def clean(self) -> dict:
        data = super().clean()
        if self.errors:
            return data
        values = {f: data.get(f) for f in SETTINGS}
        values.update({f: values[f] if values[f] is not None else [] for f in LIST_FIELDS})
        for name in ("special_tokens", "output_format"):
            if not values[name]:
                del values[name]
        try:
            valid = TemplateIn.model_validate(values)
        except PydanticValidationError as exc:
            raise ValidationError(errors_message(exc)) from None
        data.update(valid.model_dump())
        return data


class ImportForm(forms.Form):
    file = forms.FileField(help_text="A .json file from Export (at most 1 MB).")
    on_conflict = forms.ChoiceField(
        choices=[(key, ON_CONFLICT_LABELS[key]) for key in ON_CONFLICT], initial="skip"
    )


@admin.register(ExtractionTemplate)
class ExtractionTemplateAdmin(admin.ModelAdmin):
    form = TemplateAdminForm
    list_display = ("name", "layers_list", "hook_types_list", "is_favorite", "updated_at")
    list_filter = ("is_favorite",)
    search_fields = ("name", "description")
    readonly_fields = ("id", "created_at", "updated_at")
    fields = ("id", *SETTINGS, "created_at", "updated_at")
    actions = ("export_selected", "duplicate_selected", "toggle_favorite")

    @admin.display(description="Layers")
    def layers_list(self, obj: ExtractionTemplate) -> str:
        return obj.layers_display

    @admin.display(description="Hook types")
    def hook_types_list(self, obj: ExtractionTemplate) -> str:
        return obj.hooks_display

    @admin.action(description="Export selected templates (JSON file)")
    def export_selected(self, request: HttpRequest, queryset) -> HttpResponse:
        ids = list(queryset.values_list("pk", flat=True))
        return export_response(services.templates_export(ids=ids))

    @admin.action(description="Duplicate selected templates", permissions=["add"])
    def duplicate_selected(self, request: HttpRequest, queryset) -> None:
        copies = [services.template_duplicate(row.pk) for row in queryset]
        self.message_user(request, f"Duplicated {len(copies)} template(s).", messages.SUCCESS)

    @admin.action(description="Toggle favourite", permissions=["change"])
    def toggle_favorite(self, request: HttpRequest, queryset) -> None:
        for row in queryset:
            services.template_favorite_set(row.pk, is_favorite=not row.is_favorite)
        self.message_user(request, f"Toggled {queryset.count()} template(s).", messages.SUCCESS)

    def get_urls(self):
        view = self.admin_site.admin_view(self.import_view)
        return [
            path("import/", view, name="templates_app_extractiontemplate_import"),
            *super().get_urls(),
        ]

    def import_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = ImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            try:
                return self._import(request, form.cleaned_data)
            except ServiceError as exc:
                form.add_error("file", exc.message)
                return self._import_page(request, form, status=exc.status)
        return self._import_page(request, form, status=400 if form.errors else 200)

    def _import(self, request: HttpRequest, data: dict) -> HttpResponse:
        upload = data["file"]
        services.import_size_check(upload.size)
        summary = services.templates_import(raw=upload.read(), on_conflict=data["on_conflict"])
        imported = summary["imported"]["extraction_templates"]
        skipped = summary["skipped"]["extraction_templates"]
        errors = summary["errors"]
        self.message_user(
            request,
            f"Imported {imported}, skipped {skipped}, {len(errors)} error(s).",
            messages.SUCCESS,
        )
        for err in errors[:MAX_ERROR_MESSAGES]:
            self.message_user(
                request, f"Template #{err['index']}: {err['reason']}", messages.WARNING
            )
        return redirect("admin:templates_app_extractiontemplate_changelist")

    def _import_page(self, request: HttpRequest, form: ImportForm, status: int) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Import extraction templates",
            "form": form,
        }
        return TemplateResponse(
            request, "admin/templates_app/extractiontemplate/import.html", context, status=status
        )
