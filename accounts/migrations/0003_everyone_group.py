from django.db import migrations


def create_everyone(apps, schema_editor):
    AccessGroup = apps.get_model("accounts", "AccessGroup")
    AccessGroup.objects.get_or_create(
        name="Everyone",
        defaults={"is_builtin": True, "description": "Every user. Attach a model here to make it public."},
    )


class Migration(migrations.Migration):
    dependencies = [("accounts", "0002_initial")]

    operations = [migrations.RunPython(create_everyone, migrations.RunPython.noop)]
