"""One job model (mistudio.jobs.Job): the cancel flag's Python name changes, its column does not;
the progress check comes from the job model."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("datasets_app", "0001_initial")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RemoveField(model_name="dataset", name="cancel_requested"),
                migrations.AddField(
                    model_name="dataset",
                    name="cancel_flag",
                    field=models.BooleanField(default=False, db_column="cancel_requested"),
                ),
            ],
            database_operations=[],
        ),
        migrations.RemoveConstraint(model_name="dataset", name="dataset_progress_0_100"),
        migrations.AddConstraint(
            model_name="dataset",
            constraint=models.CheckConstraint(
                condition=models.Q(progress__gte=0) & models.Q(progress__lte=100),
                name="datasets_app_dataset_progress_0_100",
            ),
        ),
    ]
