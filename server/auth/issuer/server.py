"""The dev issuer's authorization server, on authlib's grant framework (authlib does the protocol).

- authorization code with PKCE, S256 only and required of every client (OAuth 2.1);
- refresh tokens, rotated on every use (the used one stops working);
- client credentials, for the demo agents (`demo-agent`, `ops-agent`: their secrets are in
  `<data_dir>/dev-issuer-agents.json`) and for any client registered with that grant;
- dynamic client registration (RFC 7591), open (dev), and client ID metadata documents;
- RFC 8707: a `resource` other than this gateway's is `invalid_target`; every token's audience is it;
- RFC 9207: the authorization response names the issuer (`iss`).

Access tokens are the same JWTs `castellan token` mints (server/auth/devkeys.py, the same key), so the
gateway verifies both alike. Never enabled in production (server/production.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import AuthorizationServer, OAuth2Error
from authlib.oauth2.rfc6749 import OAuth2Request
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, ClientCredentialsGrant, RefreshTokenGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload, JsonPayload, JsonRequest
from authlib.oauth2.rfc6749.util import scope_to_list
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7591 import ClientRegistrationEndpoint, InvalidClientMetadataError
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from joserfc.jwk import ECKey, KeySet

from server.auth.devkeys import load_or_create_dev_key, mint_dev_token
from server.auth.issuer.client_documents import ClientDocuments, client_claims
from server.auth.issuer.identities import DEMO_IDENTITIES, OPERATOR_SCOPES, DemoIdentity, demo_identity
from server.auth.issuer.store import (
    AuthorizationCode,
    IssuerClient,
    IssuerStore,
    RefreshToken,
    RefreshTokenReused,
    SignIn,
)
from server.settings import Settings

AGENTS_FILE = "dev-issuer-agents.json"
REFRESH_TTL_SECONDS = 30 * 24 * 3600
PUBLIC_OR_SECRET = ["none", "client_secret_basic", "client_secret_post"]
AUTHORIZE_PATH, TOKEN_PATH, REGISTER_PATH, JWKS_PATH = (
    "/oauth2/authorize",
    "/oauth2/token",
    "/oauth2/register",
    "/oauth2/jwks.json",
)


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]
    """RFC 8707 §2: the resource is not this gateway."""

    error = "invalid_target"


@dataclass
class Reply:
    """An authlib response before it becomes an HTTP one (authlib's RFC 9207 hook edits `location`)."""

    status: int
    body: Any
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def location(self) -> str | None:
        return next((v for k, v in self.headers if k.lower() == "location"), None)

    @location.setter
    def location(self, value: str) -> None:
        self.headers = [(k, v) for k, v in self.headers if k.lower() != "location"] + [("Location", value)]


class FormRequest(OAuth2Request):  # type: ignore[misc]
    """authlib's request with its form and query, as its framework integrations build it."""

    def __init__(self, method: str, uri: str, headers: Any, datalist: dict[str, list[str]]) -> None:
        super().__init__(method, uri, headers=headers)
        single = {k: v[0] for k, v in datalist.items()}
        self.form_data = single
        self.payload = BasicOAuth2Payload(single)
        self.payload._datalist = datalist  # authlib refuses repeated parameters from this

    @property
    def form(self) -> dict[str, str]:
        return self.form_data

    @property
    def args(self) -> dict[str, str]:
        return self.form_data


class _Json(JsonPayload):  # type: ignore[misc]
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


def json_request(method: str, uri: str, headers: Any, data: dict[str, Any]) -> JsonRequest:
    request = JsonRequest(method, uri, headers)
    request.payload = _Json(data)
    return request


def _check_resource(issuer: DevIssuer, request: OAuth2Request) -> None:
    for resource in request.payload.datalist.get("resource", []):
        if resource not in (issuer.resource_url, issuer.audience):
            raise InvalidTargetError(description=f"this issuer issues tokens for {issuer.resource_url} only")


class _S256Only(CodeChallenge):  # type: ignore[misc]
    """PKCE required of every client, S256 only (OAuth 2.1 §4.1.1; `plain` protects nothing)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("code_challenge is required (PKCE)", redirect_uri=redirect_uri)
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256", redirect_uri=redirect_uri)
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise InvalidRequestError("code_verifier is required (PKCE)")
        super().validate_code_verifier(grant, result)


class _CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = PUBLIC_OR_SECRET
    server: _Server

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        try:
            _check_resource(self.server.issuer, self.request)
        except OAuth2Error as error:
            error.redirect_uri = redirect_uri
            raise
        return redirect_uri

    def validate_token_request(self) -> None:
        super().validate_token_request()
        _check_resource(self.server.issuer, self.request)

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        sign_in: SignIn = request.user
        data = request.payload.data
        self.server.issuer.store.save_code(
            AuthorizationCode(
                code=code,
                client_id=request.client.client_id,
                redirect_uri=request.payload.redirect_uri or "",
                scope=" ".join(sign_in.scopes),
                identity=sign_in.identity.name,
                code_challenge=data["code_challenge"],
                code_challenge_method=data["code_challenge_method"],
                expires_at=self.server.issuer.store.code_expiry(),
            )
        )

    def query_authorization_code(self, code: str, client: IssuerClient) -> AuthorizationCode | None:
        return self.server.issuer.store.code(code, client.client_id)

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        self.server.issuer.store.use_code(authorization_code.code)

    def authenticate_user(self, authorization_code: AuthorizationCode) -> SignIn | None:
        identity = demo_identity(authorization_code.identity)
        return SignIn(identity, tuple(scope_to_list(authorization_code.scope) or ())) if identity else None


class _RefreshGrant(RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = PUBLIC_OR_SECRET
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotated: OAuth 2.1 §4.3.1 for public clients
    server: _Server

    def validate_token_request(self) -> None:
        super().validate_token_request()
        _check_resource(self.server.issuer, self.request)

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        return self.server.issuer.store.refresh_token(refresh_token)

    def authenticate_user(self, refresh_token: RefreshToken) -> SignIn | None:
        identity = demo_identity(refresh_token.identity)
        return SignIn(identity, tuple(scope_to_list(refresh_token.scope) or ())) if identity else None

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        pass  # save_token rotated it, atomically with storing its successor


class _ClientCredentialsGrant(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
    server: _Server

    def validate_token_request(self) -> None:
        super().validate_token_request()
        _check_resource(self.server.issuer, self.request)

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        client: IssuerClient = self.request.client
        requested = scope_to_list(self.request.payload.scope) or []
        identity = demo_identity(client.identity) if client.identity else None
        if identity is not None:
            scopes = identity.grantable(requested) if requested else list(identity.default_scopes())
            user: SignIn | None = SignIn(identity, tuple(scopes))
        else:  # a registered service: itself, no demo groups, no operator scopes
            scopes = [s for s in requested if not s.startswith("castellan:")]
            user = None
        token = self.generate_token(scope=" ".join(scopes), user=user, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class _Registration(ClientRegistrationEndpoint):  # type: ignore[misc]
    """RFC 7591, open: anyone who can reach the dev issuer may register (it is a dev issuer)."""

    server: _Server

    def authenticate_token(self, request: JsonRequest) -> str:
        return "open-registration"

    def get_server_metadata(self) -> dict[str, Any]:
        return self.server.issuer.metadata()

    def extract_client_metadata(self, request: JsonRequest) -> dict[str, Any]:
        data = dict(request.payload.data or {})
        data.pop("client_id", None)
        claims = client_claims(data, self.get_server_metadata())
        try:
            claims.validate()
        except Exception as exc:  # joserfc's claim errors: the metadata is what is wrong
            raise InvalidClientMetadataError(getattr(exc, "description", str(exc))) from None
        metadata: dict[str, Any] = claims.get_registered_claims()
        grants = metadata.get("grant_types") or ["authorization_code"]
        if "authorization_code" in grants and not metadata.get("redirect_uris"):
            raise InvalidClientMetadataError("redirect_uris are required for the authorization_code grant")
        return metadata

    def generate_client_id(self, request: JsonRequest) -> str:
        name = str((request.payload.data or {}).get("client_name") or "client")
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32] or "client"
        return f"{slug}-{secrets.token_hex(4)}"  # readable in the audit log, where it is the agent

    def generate_client_info(self, request: JsonRequest) -> dict[str, Any]:
        info: dict[str, Any] = super().generate_client_info(request)
        if (request.payload.data or {}).get("token_endpoint_auth_method", "client_secret_basic") == "none":
            info.pop("client_secret", None)
            info.pop("client_secret_expires_at", None)
        return info

    def save_client(
        self, client_info: dict[str, Any], client_metadata: dict[str, Any], request: JsonRequest
    ) -> IssuerClient:
        client = IssuerClient.from_document({**client_metadata, **client_info})
        self.server.issuer.store.save_client(client)
        return client


class _Tokens(BearerTokenGenerator):  # type: ignore[misc]
    """Access tokens minted like `castellan token` mints them (same key, same claims)."""

    def __init__(self, issuer: DevIssuer) -> None:
        super().__init__(self._access_token, self._refresh_token, issuer.token_ttl)
        self._issuer = issuer

    def _access_token(self, client: IssuerClient, grant_type: str, user: SignIn | None, scope: str) -> str:
        groups: tuple[str, ...] = ()
        if user is None:
            agent, subject = client.client_id, client.client_id
        elif user.identity.kind == "agent":
            agent, subject, groups = user.identity.name, user.identity.name, user.identity.groups
        else:  # a user signed in through an MCP client: the client is the agent acting for them
            agent, subject, groups = client.client_id, user.identity.name, user.identity.groups
        return mint_dev_token(
            self._issuer.data_dir,
            agent=agent,
            subject=subject,
            issuer=self._issuer.issuer,
            audience=self._issuer.audience,
            groups=groups,
            scopes=scope_to_list(scope) or [],
            ttl_seconds=self._issuer.token_ttl,
            client_id=client.client_id,
        )

    @staticmethod
    def _refresh_token(**_: Any) -> str:
        return secrets.token_urlsafe(32)

    def generate(self, grant_type: str, client: IssuerClient, *args: Any, **kwargs: Any) -> dict[str, Any]:
        token: dict[str, Any] = super().generate(grant_type, client, *args, **kwargs)
        token.setdefault("scope", "")  # RFC 6749 §5.1: say so when less than was asked is granted
        return token


class _Server(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, issuer: DevIssuer) -> None:
        super().__init__(scopes_supported=None)
        self.issuer = issuer
        self.register_token_generator("default", _Tokens(issuer))
        self.register_grant(_CodeGrant, [_S256Only(required=True)])
        self.register_grant(_RefreshGrant)
        self.register_grant(_ClientCredentialsGrant)
        self.register_endpoint(_Registration)
        names_issuer = IssuerParameter()
        names_issuer.get_issuer = lambda: issuer.issuer
        self.register_extension(names_issuer)

    def query_client(self, client_id: str) -> IssuerClient | None:
        return self.issuer.client(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        refresh = token.get("refresh_token")
        if refresh and isinstance(request.user, SignIn):
            client_id, identity, scope = request.client.client_id, request.user.identity.name, token.get("scope", "")
            old = getattr(request, "refresh_token", None)
            if not isinstance(old, RefreshToken):  # a new grant: a new family
                self.issuer.store.save_refresh_token(refresh, client_id, identity, scope, REFRESH_TTL_SECONDS)
                return
            try:
                self.issuer.store.rotate_refresh_token(old, refresh, client_id, identity, scope, REFRESH_TTL_SECONDS)
            except RefreshTokenReused:
                raise InvalidGrantError("the refresh token was already used; its sign-in is revoked") from None

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        return request  # the routes build it (FormRequest)

    def create_json_request(self, request: JsonRequest) -> JsonRequest:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> Reply:
        return Reply(status, body, list(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None


class DevIssuer:
    """The dev issuer of one gateway: `issuer` (its base URL) issues tokens for `audience` only."""

    def __init__(
        self,
        *,
        issuer: str,
        resource_url: str,
        audience: str,
        data_dir: Path,
        scopes: list[str],
        token_ttl: int = 3600,
        private_documents: bool = False,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.resource_url = resource_url
        self.audience = audience
        self.data_dir = data_dir
        self.token_ttl = token_ttl
        self.scopes = list(dict.fromkeys([*scopes, *OPERATOR_SCOPES, "offline_access"]))
        self.key: ECKey = load_or_create_dev_key(data_dir)
        self.store = IssuerStore(data_dir / "dev-issuer.db")
        self.documents = ClientDocuments(self.metadata(), allow_private=private_documents)
        self.agents = _load_or_create_agents(data_dir / AGENTS_FILE)
        self.server = _Server(self)

    def close(self) -> None:
        self.store.close()

    def client(self, client_id: str) -> IssuerClient | None:
        return self.agents.get(client_id) or self.documents.cached(client_id) or self.store.client(client_id)

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 authorization server metadata."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}{AUTHORIZE_PATH}",
            "token_endpoint": f"{self.issuer}{TOKEN_PATH}",
            "registration_endpoint": f"{self.issuer}{REGISTER_PATH}",
            "jwks_uri": f"{self.issuer}{JWKS_PATH}",
            "scopes_supported": self.scopes,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "token_endpoint_auth_methods_supported": PUBLIC_OR_SECRET,
            "code_challenge_methods_supported": ["S256"],
            "client_id_metadata_document_supported": True,
            "authorization_response_iss_parameter_supported": True,
            "service_documentation": "https://github.com/castellan/castellan/blob/main/docs/identity.md",
        }

    def public_keys(self) -> dict[str, Any]:
        return dict(KeySet([ECKey.import_key(self.key.as_dict(private=False))]).as_dict())

    def identities(self) -> tuple[DemoIdentity, ...]:
        return DEMO_IDENTITIES

    def denied_redirect(self, redirect_uri: str, state: str | None) -> str:
        params = [("error", "access_denied"), ("iss", self.issuer)] + ([("state", state)] if state else [])
        return str(add_params_to_uri(redirect_uri, params))


def _load_or_create_agents(path: Path) -> dict[str, IssuerClient]:
    """The demo agents as confidential clients (client credentials), secrets created (0600) on first use."""
    try:
        secrets_by_agent: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        secrets_by_agent = {}
    agents = [i.name for i in DEMO_IDENTITIES if i.kind == "agent"]
    if any(name not in secrets_by_agent for name in agents):
        secrets_by_agent = {name: secrets_by_agent.get(name) or secrets.token_urlsafe(24) for name in agents}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(secrets_by_agent, fh, indent=2)
        os.replace(tmp, path)
    return {
        name: IssuerClient(
            client_id=name,
            grant_types=("client_credentials",),
            response_types=(),
            auth_method="client_secret_basic",
            secret=secrets_by_agent[name],
            name=name,
            identity=name,
        )
        for name in agents
    }


def build_dev_issuer(settings: Settings, scopes: list[str]) -> DevIssuer | None:
    """The dev issuer for these settings (dev mode with `auth.dev_issuer`), else None. `scopes`: those the
    protected resource metadata advertises (the issuer offers them and the operator scopes)."""
    if settings.auth.mode != "dev" or not settings.auth.dev_issuer:
        return None
    return DevIssuer(
        issuer=settings.issuer,
        resource_url=settings.resource_url,
        audience=settings.audience,
        data_dir=settings.data_dir,
        scopes=scopes,
        token_ttl=settings.auth.dev_token_ttl_seconds,
        private_documents=settings.auth.dev_issuer_private_documents,
    )
