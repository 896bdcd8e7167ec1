"""Encrypt the upstream credentials stored in clear, so a database dump alone leaks none.

Reversible: going back decrypts them into the clear column the earlier code reads, which needs
the key they were encrypted with (GATEWAY_ENCRYPTION_KEYS, or the embedded .encryption_key).
"""

from django.db import migrations, models

from common.crypto import UndecryptableToken, decrypt, encrypt


def encrypt_credentials(apps, schema_editor):
    Endpoint = apps.get_model("gateway", "Endpoint")
    endpoints = list(Endpoint.objects.using(schema_editor.connection.alias).exclude(api_key=""))
    for endpoint in endpoints:
        endpoint.api_key_encrypted = encrypt(endpoint.api_key)
        # Blanked in the same write: the live row then holds no clear value, even on disk, before
        # the column is dropped (PostgreSQL drops a column without rewriting the rows).
        endpoint.api_key = ""
    Endpoint.objects.using(schema_editor.connection.alias).bulk_update(endpoints, ["api_key_encrypted", "api_key"])


def decrypt_credentials(apps, schema_editor):
    Endpoint = apps.get_model("gateway", "Endpoint")
    endpoints = list(Endpoint.objects.using(schema_editor.connection.alias).exclude(api_key_encrypted=""))
    for endpoint in endpoints:
        try:
            endpoint.api_key = decrypt(endpoint.api_key_encrypted)
        except UndecryptableToken:
            raise RuntimeError(
                f"Cannot migrate back: no key in GATEWAY_ENCRYPTION_KEYS decrypts the credential of endpoint "
                f"'{endpoint.name}'. Put back the key it was encrypted with."
            ) from None
    Endpoint.objects.using(schema_editor.connection.alias).bulk_update(endpoints, ["api_key"])


class Migration(migrations.Migration):

    dependencies = [
        ("gateway", "0003_limits_and_budgets"),
    ]

    operations = [
        migrations.AddField(
            model_name="endpoint",
            name="api_key_encrypted",
            field=models.TextField(
                blank=True,
                editable=False,
                help_text="The upstream credential, encrypted (common/crypto.py); empty for none. Write-only.",
            ),
        ),
        migrations.RunPython(encrypt_credentials, decrypt_credentials),
        migrations.RemoveField(
            model_name="endpoint",
            name="api_key",
        ),
    ]
