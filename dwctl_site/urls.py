from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("ai/v1/", include("gateway.urls")),
    path("admin/", admin.site.urls),
]
