"""One job model (mistudio.jobs.Job): the cancel flag's Python name changes, its column does not,
and the progress check comes from the job model; an extraction points at its dataset through a
foreign key (null once the dataset is deleted)."""

import django.db.models.deletion
from django.db import migrations, models


def _cancel_flag(model_name: str) -> migrations.SeparateDatabaseAndState:
    return migrations.SeparateDatabaseAndState(
        state_operations=[
            migrations.RemoveField(model_name=model_name, name="cancel_requested"),
            migrations.AddField(
                model_name=model_name,
                name="cancel_flag",
                field=models.BooleanField(default=False, db_column="cancel_requested"),
            ),
        ],
        database_operations=[],
    )


APP = "models_app"


def _progress_constraint(model_name: str, old: str) -> list:
    """The 0–100 progress check now comes from the one job model, named per table."""
    return [
        migrations.RemoveConstraint(model_name=model_name, name=old),
        migrations.AddConstraint(
            model_name=model_name,
            constraint=models.CheckConstraint(
                condition=models.Q(progress__gte=0) & models.Q(progress__lte=100),
                name=f"{APP}_{model_name}_progress_0_100",
            ),
        ),
    ]


def _link_datasets(apps, schema_editor):
    """Point each extraction at its dataset when the dataset still exists."""
    ExtractionJob = apps.get_model("models_app", "ExtractionJob")
    Dataset = apps.get_model("datasets_app", "Dataset")
    known = set(Dataset.objects.values_list("pk", flat=True))
    for pk, key in ExtractionJob.objects.values_list("pk", "dataset_key"):
        if key in known:
            ExtractionJob.objects.filter(pk=pk).update(dataset_id=key)


class Migration(migrations.Migration):
    dependencies = [
        ("models_app", "0001_initial"),
        ("datasets_app", "0001_initial"),
    ]

    operations = [
        _cancel_flag("model"),
        _cancel_flag("extractionjob"),
        migrations.RenameField(model_name="extractionjob", old_name="dataset_id", new_name="dataset_key"),
        migrations.AddField(
            model_name="extractionjob",
            name="dataset",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="extractions",
                to="datasets_app.dataset",
            ),
        ),
        migrations.RunPython(_link_datasets, migrations.RunPython.noop),
        migrations.RemoveField(model_name="extractionjob", name="dataset_key"),
        *_progress_constraint("model", "progress_0_100"),
        *_progress_constraint("extractionjob", "extraction_progress"),
    ]
