"""`castellan sts`: a narrowly scoped RFC 8693 token-exchange service, for issuers that have none.

Ory Hydra (like several OIDC providers) does not implement token exchange. Where the identity provider
does (Keycloak's standard token exchange, Entra's on-behalf-of, Okta), point `token_exchange.token_url`
at it instead; this service exists so that a deployment on such an issuer still gets per-user upstream
tokens. It does one thing, on authlib's grant framework (client authentication, error responses):

- only `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`, from registered confidential
  clients (the gateway), authenticated with `client_secret_basic` or `client_secret_post`;
- the subject token must be an access token from the one trusted issuer, for the one trusted
  audience (the gateway's resource: a token meant for another service cannot be exchanged), verified
  like the gateway verifies it; no actor tokens, no delegation chains;
- one `audience` (or `resource`), which must be on the client's list (`invalid_target` otherwise);
- the scopes issued are the requested ones (all, if none is asked) within the audience's ceiling and
  within what the subject's groups are granted there (`invalid_scope` when nothing is left);
- the issued JWT names the user (`sub`), the audience, the scopes, the agent (`client_id`) and the
  gateway as the actor (`act`, RFC 8693 §4.1), and expires no later than the subject token.

Upstreams verify the tokens with the service's JWKS (`/.well-known/jwks.json`).
"""

from __future__ import annotations

import hmac
import json
import os
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from authlib.oauth2 import AuthorizationServer, OAuth2Error
from authlib.oauth2.rfc6749 import BaseGrant, ClientMixin, OAuth2Request, TokenEndpointMixin
from authlib.oauth2.rfc6749.errors import InvalidRequestError, InvalidScopeError, UnauthorizedClientError
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.auth.keys import JwksKeys, KeySource
from server.auth.verifier import JwtVerifier
from server.credentials.secrets import read_secret
from server.errors import ConfigError, Unauthenticated
from server.identity import Identity
from server.settings import ClaimNames, SecretSource

log = structlog.get_logger("castellan.sts")

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


class AudienceRule(BaseModel):
    model_config = {"extra": "forbid"}

    scopes: list[str]
    """The most a token for this audience may carry."""
    groups: dict[str, list[str]] = Field(default_factory=dict)
    """What members of a group are granted here (`"*"`: everyone the subject token names)."""


class StsClient(BaseModel):
    model_config = {"extra": "forbid"}

    secret: SecretSource
    audiences: list[str]
    """The audiences this client may exchange tokens for."""


class SubjectIssuer(BaseModel):
    model_config = {"extra": "forbid"}

    issuer: str
    jwks_url: str
    audience: str
    """The audience a subject token must have (the gateway's resource URL)."""
    claims: ClaimNames = Field(default_factory=ClaimNames)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"])


class StsSettings(BaseModel):
    """`castellan sts --config sts.toml`: see docs/identity.md for an example."""

    model_config = {"extra": "forbid"}

    issuer: str
    """This service's URL: the `iss` of what it issues."""
    key_file: Path
    """Its signing key (an EC P-256 JWK, created mode 0600 on first start)."""
    token_ttl_seconds: int = Field(default=300, gt=0, le=3600)
    subject: SubjectIssuer
    clients: dict[str, StsClient]
    audiences: dict[str, AudienceRule]

    @classmethod
    def from_file(cls, path: Path) -> StsSettings:
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
            raise ConfigError(f"invalid token service configuration: {problems}") from None


def load_or_create_key(path: Path) -> ECKey:
    if path.is_file():
        return ECKey.import_key(json.loads(path.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ECKey.generate_key("P-256", parameters={"kid": f"sts-{uuid.uuid4().hex[:12]}", "use": "sig"})
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(key.as_dict(private=True), fh)
    os.replace(path.with_suffix(".tmp"), path)
    return key


@dataclass(frozen=True)
class _Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    secret: str
    audiences: tuple[str, ...]

    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(self.secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in ("client_secret_basic", "client_secret_post")

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == TOKEN_EXCHANGE


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]
    """RFC 8693 §2.2.2: the audience or resource is not one this client may have tokens for."""

    error = "invalid_target"


class TokenExchangeGrant(BaseGrant, TokenEndpointMixin):  # type: ignore[misc]
    """RFC 8693 §2.1, narrowed as the module says."""

    GRANT_TYPE = TOKEN_EXCHANGE
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def validate_token_request(self) -> None:
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError(f"client may not use grant_type={self.GRANT_TYPE}")
        self.request.client = client
        form = self.request.payload.datalist
        for name in ("subject_token", "subject_token_type", "audience", "resource", "scope", "actor_token"):
            if len(form.get(name, [])) > 1 and name not in ("audience", "resource"):
                raise InvalidRequestError(f"{name} given more than once")
        if form.get("actor_token"):
            raise InvalidRequestError("actor tokens are not accepted (no delegation chains)")
        if self.request.payload.data.get("subject_token_type") not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise InvalidRequestError("subject_token_type must be an access token")
        requested_type = self.request.payload.data.get("requested_token_type")
        if requested_type not in (None, "", ACCESS_TOKEN_TYPE):
            raise InvalidRequestError("only access tokens are issued")
        targets = list(dict.fromkeys([*form.get("audience", []), *form.get("resource", [])]))
        if len(targets) != 1:
            raise InvalidTargetError(description="name exactly one audience (or resource)")
        if targets[0] not in client.audiences or targets[0] not in self.server.settings.audiences:
            raise InvalidTargetError(description=f"this client may not have tokens for {targets[0]}")
        subject = getattr(self.request, "subject", None)
        if not isinstance(subject, Identity):
            raise InvalidRequestError(f"subject_token refused: {subject or 'missing'}")
        self.request.audience = targets[0]
        self.request.granted = self._granted(subject, self.server.settings.audiences[targets[0]])

    def _granted(self, subject: Identity, rule: AudienceRule) -> list[str]:
        entitled = set(rule.groups.get("*", []))
        for g in subject.groups:
            entitled.update(rule.groups.get(g, []))
        requested = (self.request.payload.scope or "").split() or rule.scopes
        granted = [s for s in requested if s in rule.scopes and s in entitled]
        if not granted:
            raise InvalidScopeError(description="none of the requested scopes may be granted to this subject")
        return granted

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        subject: Identity = self.request.subject
        token, expires_in = self.server.mint(
            subject, self.request.audience, self.request.granted, self.request.client.client_id
        )
        log.info(
            "token_exchanged",
            subject=subject.subject,
            audience=self.request.audience,
            scopes=self.request.granted,
            client=self.request.client.client_id,
        )
        body = {
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "scope": " ".join(self.request.granted),
        }
        return 200, body, self.TOKEN_RESPONSE_HEADER


class TokenService(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, settings: StsSettings, subject_verifier: JwtVerifier) -> None:
        super().__init__(scopes_supported=None)
        self.settings = settings
        self.verifier = subject_verifier
        self.key = load_or_create_key(settings.key_file)
        self._clients = {
            cid: _Client(cid, read_secret(c.secret, f"sts client {cid}"), tuple(c.audiences))
            for cid, c in settings.clients.items()
        }
        self.register_grant(TokenExchangeGrant)

    def query_client(self, client_id: str) -> _Client | None:
        return self._clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        return None  # self-contained JWTs: nothing to store

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        incoming: _Incoming = request
        oauth = _FormRequest(incoming.method, incoming.url, headers=incoming.headers)
        oauth.form_data = incoming.form
        oauth.payload = BasicOAuth2Payload(incoming.form)
        # authlib's payload keeps one value per name; RFC 8693 allows several `audience`/`resource`.
        oauth.payload._datalist = incoming.datalist
        oauth.subject = incoming.subject
        return oauth

    def handle_response(self, status_code: int, payload: Any, headers: Any) -> Response:
        return JSONResponse(payload, status_code=status_code, headers=dict(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None

    def mint(self, subject: Identity, audience: str, scopes: list[str], client_id: str) -> tuple[str, int]:
        now = int(time.time())
        exp = now + self.settings.token_ttl_seconds
        if subject.expires_at is not None:
            exp = min(exp, int(subject.expires_at))
        claims = {
            "iss": self.settings.issuer,
            "sub": subject.subject,
            "aud": audience,
            "scope": " ".join(scopes),
            "client_id": subject.agent_id,
            "act": {"sub": client_id},
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        header = {"alg": "ES256", "kid": self.key.kid, "typ": "at+jwt"}
        return jwt.encode(header, claims, self.key), exp - now

    def public_keys(self) -> dict[str, Any]:
        return dict(KeySet([ECKey.import_key(self.key.as_dict(private=False))]).as_dict())


class _FormRequest(OAuth2Request):  # type: ignore[misc]
    """authlib's request with its form (client_secret_post reads it), as its framework integrations do."""

    form_data: dict[str, str]

    @property
    def form(self) -> dict[str, str]:
        return self.form_data


@dataclass
class _Incoming:
    method: str
    url: str
    headers: Any
    form: dict[str, str]
    datalist: dict[str, list[str]]
    subject: Identity | str | None


def build_sts_app(settings: StsSettings, subject_keys: KeySource | None = None) -> Starlette:
    """The token service as an ASGI app: `/token`, `/.well-known/jwks.json`, its RFC 8414 metadata.
    `subject_keys`: the subject issuer's keys (default: fetched from `subject.jwks_url`)."""
    subject = settings.subject
    verifier = JwtVerifier(
        subject_keys or JwksKeys(subject.jwks_url),
        issuer=subject.issuer,
        audience=subject.audience,
        algorithms=subject.algorithms,
        claims=subject.claims,
    )
    service = TokenService(settings, verifier)

    async def token(request: Request) -> Response:
        form = await request.form()
        datalist: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            datalist.setdefault(key, []).append(str(value))
        single = {k: v[0] for k, v in datalist.items()}
        found: Identity | str | None = None
        if single.get("grant_type") == TOKEN_EXCHANGE and single.get("subject_token"):
            try:
                found = await verifier.verify(single["subject_token"])
            except Unauthenticated as exc:
                found = exc.description
        incoming = _Incoming(request.method, str(request.url), request.headers, single, datalist, found)
        response: Response = service.create_token_response(incoming)
        return response

    async def jwks(request: Request) -> Response:
        return JSONResponse(service.public_keys())

    async def metadata(request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": settings.issuer,
                "token_endpoint": f"{settings.issuer.rstrip('/')}/token",
                "jwks_uri": f"{settings.issuer.rstrip('/')}/.well-known/jwks.json",
                "grant_types_supported": [TOKEN_EXCHANGE],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            }
        )

    return Starlette(
        routes=[
            Route("/token", token, methods=["POST"]),
            Route("/.well-known/jwks.json", jwks, methods=["GET"]),
            Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
        ]
    )
