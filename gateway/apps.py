from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        from django.conf import settings
        from django_q.signals import post_spawn

        from gateway import checks, signals  # noqa: F401  (credential check; snapshot invalidation receivers)
        from gateway.tasks import drain_on_spawn

        post_spawn.connect(drain_on_spawn, dispatch_uid="gateway-drain-on-spawn")

        if "pool" in settings.DATABASES["default"].get("OPTIONS", {}):
            from gateway.db import reconnect_steadily

            reconnect_steadily()
