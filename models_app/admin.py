from django.contrib import admin

from .models import Model


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "hf_repo_id",
        "quantization",
        "status",
        "progress",
        "params",
        "mem_req_bytes",
        "is_loaded",
        "updated_at",
    )
    list_filter = ("status", "quantization", "is_loaded")
    search_fields = ("name", "hf_repo_id")
    readonly_fields = (
        "id",
        "commit_sha",
        "status",
        "phase",
        "progress",
        "bytes_done",
        "bytes_total",
        "error_message",
        "heartbeat_at",
        "attempt",
        "local_path",
        "files",
        "size_bytes",
        "dtype",
        "quant_backend",
        "mem_req_bytes",
        "metadata",
        "created_at",
        "updated_at",
    )
    exclude = ("cancel_flag",)
