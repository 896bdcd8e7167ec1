"""ASGI entry point: the API on its own lean handler, everything else on Django's stock one."""

from __future__ import annotations

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dwctl_site.settings")
django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402

from gateway.handler import GatewayHandler, lifespan  # noqa: E402

if settings.ENV_ERRORS:
    raise ImproperlyConfigured("Bad environment:\n  " + "\n  ".join(settings.ENV_ERRORS))

gateway_application = GatewayHandler()
site_application = ASGIStaticFilesHandler(django_application)


async def http_router(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["path"].startswith("/ai/"):
        return await gateway_application(scope, receive, send)
    return await site_application(scope, receive, send)


application = ProtocolTypeRouter({"http": http_router, "lifespan": lifespan})

# Everything loaded so far lives as long as the process: move it out of the collector's way, so
# a full collection scans only what requests allocate (it took 50-70 ms per pass, measured in
# bench/README.md, stalling every request in flight).
gc.freeze()
