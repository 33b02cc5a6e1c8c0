"""What the gateway serves beyond tools, registered with the SDK server as sources appear: its capabilities
are what it and its upstreams really serve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.prompts.catalog import PromptCatalog
from server.protocol.completions import CompletionHandlers
from server.protocol.logging import LogLevels
from server.protocol.notifications import ListChanges, SessionTracker
from server.protocol.prompts import PromptHandlers
from server.protocol.resources import ResourceHandlers
from server.resources.catalog import ResourceCatalog


class GatewayServer(Server[Any]):
    """The SDK server, declaring `listChanged` to 2025-era clients once the gateway sends list changes
    (on 2026-07-28 the SDK derives it from `subscriptions/listen` being served)."""

    list_changed = False
    subscribes: Callable[[], bool] = staticmethod(lambda: False)
    """Resource updates are delivered (some upstream sends them): `resources.subscribe` is declared only then."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        if notification_options is None and self.list_changed:
            notification_options = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        if extensions is None:  # the 2025-era handshake: without the extensions served on 2026-07-28 only
            extensions = {k: v for k, v in self.extensions.items() if k not in self.modern_extensions}
        options = super().create_initialization_options(notification_options, experimental_capabilities, extensions)
        if not options.capabilities.extensions:
            options.capabilities.extensions = None
        return options

    modern_extensions: frozenset[str] = frozenset({"io.modelcontextprotocol/tasks"})
    """Extensions served on 2026-07-28 only: not declared to a 2025-era client (its `initialize`)."""

    def get_capabilities(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
        *,
        protocol_version: str | None = None,
    ) -> types.ServerCapabilities:
        legacy = extensions is None and protocol_version not in MODERN_PROTOCOL_VERSIONS
        if legacy:
            extensions = {k: v for k, v in self.extensions.items() if k not in self.modern_extensions}
        capabilities = super().get_capabilities(
            notification_options, experimental_capabilities, extensions, protocol_version=protocol_version
        )
        if legacy and not capabilities.extensions:
            capabilities.extensions = None
        # On 2026-07-28 the SDK declares `subscribe` whenever subscriptions/listen is served; the gateway
        # says so only when an update can really reach the subscriber.
        if capabilities.resources is not None and capabilities.resources.subscribe and not self.subscribes():
            capabilities.resources = capabilities.resources.model_copy(update={"subscribe": False})
        return capabilities


@dataclass
class Surface:
    """The handlers of the non-tool methods and the catalogs they serve. `attach` registers a
    method's handlers once something can answer it (`resources` is declared only when there are
    resources, `prompts` when there are prompts, `completions` when a source completes), and again
    whenever a catalog changes. `completes` says whether any source declared completions. `logging`
    is always declared: the gateway tells a client that asks what it decided for each of its acts."""

    resources: ResourceCatalog
    resource_handlers: ResourceHandlers
    prompts: PromptCatalog
    prompt_handlers: PromptHandlers
    completion_handlers: CompletionHandlers
    levels: LogLevels
    changes: ListChanges
    completes: Callable[[], bool] = lambda: False

    def attach(self, server: Server[Any]) -> None:
        server.middleware.append(SessionTracker(self.changes))
        subscriptions = self.resource_handlers.subscriptions
        if isinstance(server, GatewayServer):
            server.list_changed = True
            if subscriptions is not None:
                server.subscribes = subscriptions.served
        if subscriptions is not None:
            self.changes.listened = self.resource_handlers.listened
            self.changes.unlistened = self.resource_handlers.unlistened
        self.install(server)
        self.resources.on_change(lambda: self.install(server))
        self.prompts.on_change(lambda: self.install(server))

    def install(self, server: Server[Any]) -> None:
        if server.get_request_handler("subscriptions/listen") is None:  # list changes, 2026-07-28
            server.add_request_handler(
                "subscriptions/listen", types.SubscriptionsListenRequestParams, self.changes.listen
            )
        if server.get_request_handler("logging/setLevel") is None:  # the gateway logs its decisions
            server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, self.levels.set_level)
        if len(self.resources) and server.get_request_handler("resources/list") is None:
            h = self.resource_handlers
            server.add_request_handler("resources/list", types.PaginatedRequestParams, h.list_resources)
            server.add_request_handler(
                "resources/templates/list", types.PaginatedRequestParams, h.list_resource_templates
            )
            server.add_request_handler("resources/read", types.ReadResourceRequestParams, h.read_resource)
        subscriptions = self.resource_handlers.subscriptions
        if (
            len(self.resources)
            and subscriptions is not None
            and subscriptions.served()
            and server.get_request_handler("resources/subscribe") is None
        ):  # 2025 sessions; 2026-07-28 subscribes on subscriptions/listen
            h = self.resource_handlers
            server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, h.subscribe)
            server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, h.unsubscribe)
        if len(self.prompts) and server.get_request_handler("prompts/list") is None:
            p = self.prompt_handlers
            server.add_request_handler("prompts/list", types.PaginatedRequestParams, p.list_prompts)
            server.add_request_handler("prompts/get", types.GetPromptRequestParams, p.get_prompt)
        if self.completes() and server.get_request_handler("completion/complete") is None:
            c = self.completion_handlers
            server.add_request_handler("completion/complete", types.CompleteRequestParams, c.complete)
