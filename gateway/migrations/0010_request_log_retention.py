from django.db import migrations, models

NAME = "gateway: request log retention"


def create_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name=NAME,
        defaults={"func": "gateway.tasks.prune_request_log", "schedule_type": "H", "repeats": -1},
    )


def delete_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0009_endpoint_responses_api"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [
        # A user's spend today and this month (their admin page) reads only their rows of the period.
        migrations.AddIndex(
            model_name="requestlog",
            index=models.Index(fields=["user", "created_at"], name="requestlog_user_time"),
        ),
        migrations.RunPython(create_schedule, delete_schedule),
    ]
