"""The admin site: "dwctl admin", the gateway's models first, django-q2's pages under "Queue", the usage page."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest
from django.urls import URLPattern, URLResolver, path

# The index's order: what operators use most first, Django's own auth groups last.
APP_ORDER = ("gateway", "accounts", "billing", "routing_rules", "django_q", "auth")
APP_NAMES = {"django_q": "Queue"}


class GatewayAdminSite(admin.AdminSite):
    site_header = "dwctl admin"
    site_title = "dwctl admin"
    index_title = "Gateway administration"
    index_template = "admin/dwctl_index.html"

    def get_app_list(self, request: HttpRequest, app_label: str | None = None) -> list[Any]:
        apps = super().get_app_list(request, app_label)
        for app in apps:
            app["name"] = APP_NAMES.get(app["app_label"], app["name"])
        rank = {label: i for i, label in enumerate(APP_ORDER)}
        return sorted(apps, key=lambda app: (rank.get(app["app_label"], len(rank)), app["name"]))

    def get_urls(self) -> list[URLResolver | URLPattern]:
        from gateway.dashboard import usage_view

        return [path("usage/", self.admin_view(usage_view), name="usage"), *super().get_urls()]


class GatewayAdminConfig(AdminConfig):
    default_site = "dwctl_site.admin_site.GatewayAdminSite"
