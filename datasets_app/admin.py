from django.contrib import admin

from .models import Dataset


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("name", "source", "status", "row_count", "size_bytes", "created_at")
    list_filter = ("status", "source")
    search_fields = ("name", "hf_dataset_id", "original_filename")
    readonly_fields = ("id", "created_at", "updated_at", "heartbeat_at")
