from django.contrib import admin
from django.urls import include, path
from django.views import defaults

from gateway import demo
from gateway.errors import internal_error, openai_error
from gateway.exposition import metrics
from management_api.api import unknown_path
from management_api.api import urls as management_api_urls

urlpatterns = [
    path("ai/v1/", include("gateway.urls")),
    # Before the admin's own URLs, whose catch-all would otherwise take these paths.
    path("admin/api/v1/", management_api_urls()),
    path("admin/api/<path:rest>", unknown_path),
    path("admin/", admin.site.urls),
    path("metrics", metrics, name="metrics"),
    # The echo upstream of `manage.py demo` (gateway/demo.py): the gateway calls it, clients do not.
    path("demo/v1/chat/completions", demo.chat_completions, name="demo-chat-completions"),
    path("demo/v1/responses", demo.responses, name="demo-responses"),
]


# The API answers even its own failures in OpenAI's envelope; the admin keeps Django's pages.
def handler404(request, exception):  # type: ignore[no-untyped-def]
    if request.path.startswith("/ai/"):
        return openai_error(404, f"Unknown API path '{request.path}'.", code="unknown_url")
    return defaults.page_not_found(request, exception)


def handler500(request):  # type: ignore[no-untyped-def]
    if request.path.startswith("/ai/"):
        return internal_error()
    if request.path.startswith("/admin/api/"):
        return openai_error(500, "The management API failed to handle this request.", code="internal_error")
    return defaults.server_error(request)
