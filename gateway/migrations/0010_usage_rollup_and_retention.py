from django.conf import settings
from django.db import migrations, models

# Every minute the dashboard's rollup takes in the hours that got new request-log rows; every hour
# rows past GATEWAY_LOG_RETENTION_DAYS are deleted.
SCHEDULES = {
    "gateway: usage rollup": {"func": "gateway.tasks.roll_up_usage", "schedule_type": "I", "minutes": 1},
    "gateway: request log retention": {"func": "gateway.tasks.prune_request_log", "schedule_type": "H"},
}


def create_schedules(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    for name, fields in SCHEDULES.items():
        Schedule.objects.update_or_create(name=name, defaults={**fields, "repeats": -1})


def delete_schedules(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name__in=SCHEDULES).delete()


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0004_limits_and_budgets'),
        ('gateway', '0009_endpoint_responses_api'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [
        migrations.CreateModel(
            name='UsageRollup',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('hour', models.DateTimeField()),
                ('dimension', models.CharField(max_length=8)),
                ('value', models.CharField(blank=True, default='', max_length=200)),
                ('requests', models.PositiveBigIntegerField(default=0)),
                ('errors', models.PositiveBigIntegerField(default=0)),
                ('input_tokens', models.PositiveBigIntegerField(default=0)),
                ('output_tokens', models.PositiveBigIntegerField(default=0)),
                ('spend_nano', models.BigIntegerField(default=0, help_text='Credits spent, in nano-credits (exact sums).')),
                ('latency_bins', models.JSONField(default=dict, help_text='Answered calls per latency bin (usage.LATENCY_BIN).')),
            ],
        ),
        migrations.CreateModel(
            name='UsageRollupMark',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=50, unique=True)),
                ('last_id', models.BigIntegerField(default=0)),
            ],
        ),
        migrations.AddIndex(
            model_name='requestlog',
            index=models.Index(fields=['user', 'created_at'], name='requestlog_user_time'),
        ),
        migrations.AddConstraint(
            model_name='usagerollup',
            constraint=models.UniqueConstraint(fields=('dimension', 'hour', 'value'), name='usage_rollup_unique'),
        ),
        migrations.RunPython(create_schedules, delete_schedules),
    ]
