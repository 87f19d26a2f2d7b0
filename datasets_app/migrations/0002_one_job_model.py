"""One job model (mistudio.jobs.Job): the cancel flag's Python name changes, its column does not."""

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
        )
    ]
