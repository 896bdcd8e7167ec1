from django.apps import AppConfig


class SiteConfig(AppConfig):
    name = "dwctl_site"
    verbose_name = "Site"

    def ready(self) -> None:
        from dwctl_site import checks  # noqa: F401  (registers the environment check)
