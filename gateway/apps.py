from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        from django.conf import settings

        from gateway import checks, signals  # noqa: F401  (credential check; snapshot invalidation receivers)

        if "pool" in settings.DATABASES["default"].get("OPTIONS", {}):
            from gateway.db import reconnect_steadily

            reconnect_steadily()
