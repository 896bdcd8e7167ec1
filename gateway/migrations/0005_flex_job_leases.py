from django.db import migrations, models


def lapse_held_flex_jobs(apps, schema_editor):
    # Jobs claimed before leases existed have no worker renewing them: let the next worker take them.
    jobs = apps.get_model("gateway", "InferenceRequest").objects.using(schema_editor.connection.alias)
    jobs.filter(service_tier="flex", state__in=("claimed", "processing")).update(
        lease_expires_at=models.F("updated_at")
    )


class Migration(migrations.Migration):
    dependencies = [("gateway", "0004_encrypt_endpoint_credentials")]

    operations = [
        migrations.AddField(
            model_name="inferencerequest",
            name="lease_expires_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(lapse_held_flex_jobs, migrations.RunPython.noop),
    ]
