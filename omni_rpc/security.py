"""Who may call what, over which transport: bearer tokens with roles, TLS and mutual TLS.

Three roles (see docs/security.md):

- ``node``: agents joining and leaving the coordinator (``Registry``), and the coordinator
  calling agents (``NodeAgent``): the cluster's own secret, held by the coordinator and agents.
- ``client``: ``Generate`` and the read-only ``GetStats`` / ``ListNodes``.
- ``admin``: everything a client may do, plus ``DrainNode`` (drain and undrain).

One server interceptor checks every call: no or an unknown token is ``UNAUTHENTICATED``; a
known token whose role may not call the method is ``PERMISSION_DENIED``. Tokens come from
files (one per line, so a rotation can list old and new) or ``OMNI_<ROLE>_TOKEN``; they are
compared in constant time and never logged. Health checks stay open by default (Kubernetes
probes carry no token); reflection needs a token unless opened.

TLS: ``--tls-cert``/``--tls-key`` serve TLS; ``--tls-ca`` verifies peers (and, with
``--require-client-cert``, makes TLS mutual). The same certificate is this process's client
identity on its outgoing channels. Server certificates are re-read when their files change:
new connections get the new certificate, without a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from omni_rpc import config
from omni_rpc.logging import get_logger

log = get_logger("omni_rpc.security")

ROLES = ("client", "admin", "node")
AUTH_MODES = ("required", "off")
OPEN_MODES = ("open", "token")
BEARER = "bearer "

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# Method (or service prefix ending in "/") -> roles allowed. Anything else needs some valid
# token, after which gRPC answers UNIMPLEMENTED as usual.
POLICY: Mapping[str, frozenset[str]] = {
    f"/{config.REGISTRY_SERVICE}/Join": frozenset({"node"}),
    f"/{config.REGISTRY_SERVICE}/Leave": frozenset({"node"}),
    f"/{config.COORDINATOR_SERVICE}/Generate": frozenset({"client", "admin"}),
    f"/{config.COORDINATOR_SERVICE}/GetStats": frozenset({"client", "admin"}),
    f"/{config.COORDINATOR_SERVICE}/ListNodes": frozenset({"client", "admin"}),
    f"/{config.COORDINATOR_SERVICE}/DrainNode": frozenset({"admin"}),
    f"/{config.NODE_AGENT_SERVICE}/": frozenset({"node"}),
}


class SecurityConfigError(ValueError):
    """Security options that cannot work together (named in the message)."""


# -- options ------------------------------------------------------------------------------


def add_options(p: argparse.ArgumentParser, roles: Sequence[str]) -> None:
    """Auth and TLS options of a server; ``roles`` are the token files it reads."""
    group = p.add_argument_group("security (docs/security.md)")
    group.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="required",
        help="bearer tokens on every call (off: only for a trusted, local setup)",
    )
    for role in roles:
        group.add_argument(
            f"--{role}-token-file",
            metavar="PATH",
            help=f"{role} token(s), one per line (or the token in OMNI_{role.upper()}_TOKEN)",
        )
    group.add_argument(
        "--health-auth",
        choices=OPEN_MODES,
        default="open",
        help="grpc.health.v1 open to anyone (Kubernetes probes) or only with a token",
    )
    group.add_argument(
        "--reflection-auth",
        choices=OPEN_MODES,
        default="token",
        help="server reflection only with a token, or open to anyone",
    )
    group.add_argument("--tls-cert", metavar="PEM", help="this process's certificate (chain)")
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-ca", metavar="PEM", help="CA bundle that peers' certificates chain to"
    )
    group.add_argument(
        "--require-client-cert",
        action="store_true",
        help="mutual TLS: refuse clients without a certificate from --tls-ca",
    )


# -- tokens -------------------------------------------------------------------------------


def read_tokens(path: str | None, env_value: str | None = None) -> list[str]:
    """Tokens from a file (one per line, ``#`` comments) and/or an environment value."""
    tokens: list[str] = []
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SecurityConfigError(f"cannot read token file {path}: {exc.strerror}") from None
        tokens += [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
        if not tokens:
            raise SecurityConfigError(f"token file {path} holds no token")
    if env_value and env_value.strip():
        tokens.append(env_value.strip())
    return tokens


def role_tokens(role: str, args: argparse.Namespace) -> list[str]:
    """``role``'s tokens: its ``--ROLE-token-file`` and ``OMNI_ROLE_TOKEN``."""
    return read_tokens(
        getattr(args, f"{role}_token_file", None), os.environ.get(f"OMNI_{role.upper()}_TOKEN")
    )


def token_for(role: str, args: argparse.Namespace) -> str | None:
    """The token this process presents as ``role`` (first line of its file, or the env)."""
    tokens = role_tokens(role, args)
    return tokens[0] if tokens else None


def identity_of_token(token: str) -> str:
    """A stable, non-secret name for a token (for limits and logs)."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text[: len(BEARER)].lower() == BEARER:
                return text[len(BEARER) :].strip()
    return None


@dataclass
class TokenTable:
    """Known tokens and their roles."""

    by_role: dict[str, list[bytes]] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace, roles: Sequence[str]) -> TokenTable:
        table = cls()
        for role in roles:
            table.by_role[role] = [t.encode() for t in role_tokens(role, args)]
        return table

    def role_of(self, token: str | None) -> str | None:
        """The role of ``token``; every known token is compared, in constant time each."""
        if not token:
            return None
        presented = token.encode()
        found = None
        for role, tokens in self.by_role.items():
            for known in tokens:
                if hmac.compare_digest(presented, known) and found is None:
                    found = role
        return found

    def __bool__(self) -> bool:
        return any(self.by_role.values())


# -- the server interceptor ----------------------------------------------------------------


def allowed_roles(method: str) -> frozenset[str] | None:
    """Roles that may call ``method``; None: any authenticated caller."""
    if method in POLICY:
        return POLICY[method]
    service = method.rsplit("/", 1)[0] + "/"
    return POLICY.get(service)


def rejection(
    handler: Any,
    code: grpc.StatusCode,
    message: str | Callable[[grpc.aio.ServicerContext[Any, Any]], str],
) -> Any:
    """A handler of the same shape as ``handler`` that fails the call with ``code`` and
    ``message`` (or what ``message`` says for the call's context)."""

    def text(context: grpc.aio.ServicerContext[Any, Any]) -> str:
        return message if isinstance(message, str) else message(context)

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, text(context))

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, text(context))
        yield  # pragma: no cover - makes this an async generator

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, des, ser)
    return grpc.unary_unary_rpc_method_handler(abort, des, ser)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, tokens: TokenTable, health_open: bool, reflection_open: bool) -> None:
        self.tokens = tokens
        self.health_open = health_open
        self.reflection_open = reflection_open

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without auth
            return handler
        if self.is_open(method):
            return handler
        refused = self.refusal(method, bearer(handler_call_details.invocation_metadata))
        if refused is not None:
            return rejection(handler, *refused)
        return handler

    def refusal(self, method: str, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a caller presenting ``token`` may not call ``method`` (None: it may). Shared
        with the coordinator's HTTP front door, which asks on behalf of the gRPC method its
        endpoint stands for."""
        role = self.tokens.role_of(token)
        if role is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown bearer token (metadata 'authorization: Bearer <token>')",
            )
        allowed = allowed_roles(method)
        if allowed is not None and role not in allowed:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {role!r} may not call {method} (allowed: {', '.join(sorted(allowed))})",
            )
        return None

    def is_open(self, method: str) -> bool:
        """Whether ``method`` is served without a token (health, reflection when opened)."""
        return (self.health_open and method.startswith(HEALTH_PREFIX)) or (
            self.reflection_open and method.startswith(REFLECTION_PREFIXES)
        )


# -- TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False

    @classmethod
    def from_args(cls, args: Any) -> TlsFiles:
        files = cls(
            getattr(args, "tls_cert", None),
            getattr(args, "tls_key", None),
            getattr(args, "tls_ca", None),
            bool(getattr(args, "require_client_cert", False)),
        )
        files.check()
        return files

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    def check(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SecurityConfigError("--tls-cert and --tls-key go together")
        if self.require_client_cert and not (self.ca and self.cert):
            raise SecurityConfigError("--require-client-cert needs --tls-ca and --tls-cert/--key")
        for flag, path in (
            ("--tls-cert", self.cert),
            ("--tls-key", self.key),
            ("--tls-ca", self.ca),
        ):
            if path and not Path(path).is_file():
                raise SecurityConfigError(f"{flag} {path}: no such file")
        self._check_contents()

    def _check_contents(self) -> None:
        """Load the files as gRPC will (which only says "cannot bind" when they are bad)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for flag, path in (("--tls-ca", self.ca), ("--tls-cert", self.cert)):
            if path:
                try:
                    context.load_verify_locations(cafile=path)
                except ssl.SSLError as exc:
                    raise SecurityConfigError(
                        f"{flag} {path}: no PEM certificate can be read from it ({exc.reason})"
                    ) from None
        if self.cert and self.key:
            try:
                context.load_cert_chain(self.cert, self.key, password="")
            except ssl.SSLError as exc:
                raise SecurityConfigError(
                    f"--tls-key {self.key}: not an unencrypted PEM private key matching "
                    f"--tls-cert {self.cert} ({exc.reason})"
                ) from None


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _mtimes(files: TlsFiles) -> tuple[float, ...]:
    return tuple(
        os.stat(p).st_mtime_ns if p and os.path.exists(p) else 0.0
        for p in (files.cert, files.key, files.ca)
    )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS (or mutual TLS) that re-reads its files when they change, for new connections."""
    assert files.cert and files.key
    cert, key = files.cert, files.key

    def load() -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(Path(key).read_bytes(), Path(cert).read_bytes())], root_certificates=_read(files.ca)
        )

    seen = [_mtimes(files)]
    rejected: list[tuple[float, ...]] = [()]

    def fetch() -> Any:
        # Called by gRPC before each handshake: None keeps the current certificate.
        now = _mtimes(files)
        if now in (seen[0], rejected[0]):
            return None
        try:
            files.check()  # gRPC would refuse unusable files silently: say so instead
            fresh = load()
        except Exception as exc:  # a half-written file: keep serving the old certificate
            rejected[0] = now  # warned once per version of the files
            log.warning("TLS files changed but cannot be loaded yet", error=str(exc))
            return None
        seen[0] = now
        log.info("TLS certificate reloaded", cert=files.cert)
        return fresh

    return grpc.dynamic_ssl_server_credentials(
        load(), fetch, require_client_authentication=files.require_client_cert
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca),
        private_key=_read(files.key),
        certificate_chain=_read(files.cert),
    )


def peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The names in the peer's verified certificate (common name and SANs); [] without one."""
    auth = context.auth_context()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names += [v.decode() for v in auth.get(key, [])]
    return names


def client_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who is calling, for per-client limits: the token, else the certificate, else the
    peer's IP address."""
    token = bearer(context.invocation_metadata())  # type: ignore[arg-type]
    if token:
        return identity_of_token(token)
    names = peer_identities(context)
    if names:
        return "cert:" + names[0]
    peer = context.peer()  # ipv4:127.0.0.1:5555, ipv6:[::1]:5555, unix:...
    return "peer:" + peer.rsplit(":", 1)[0]


# -- clients ------------------------------------------------------------------------------


class _Bearer:
    """Adds the token to every call; works on plaintext channels too (local use, tests),
    where gRPC refuses call credentials."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under the first call type it implements, so one class
# per call type.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _bearer_interceptors(token: str) -> list[Any]:
    return [
        kind(token)
        for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    ]


@dataclass(frozen=True)
class ChannelSecurity:
    """How this process dials others: its token and TLS files (both optional)."""

    token: str | None = None
    tls: TlsFiles = TlsFiles()
    # Verify the server's certificate against this name instead of the dialed host.
    server_name: str | None = None

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            *config.GRPC_MESSAGE_OPTIONS,
            *config.RECONNECT_CHANNEL_OPTIONS,
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def aio_channel(
        self, address: str, extra_options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        interceptors = _bearer_interceptors(self.token) if self.token else None
        options = [*self.options(), *extra_options]
        if self.tls.enabled:
            return grpc.aio.secure_channel(
                address, channel_credentials(self.tls), options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(address, options, interceptors=interceptors)

    def sync_channel(
        self, address: str, extra_options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.Channel:
        options = [*self.options(), *extra_options]
        channel = (
            grpc.secure_channel(address, channel_credentials(self.tls), options)
            if self.tls.enabled
            else grpc.insecure_channel(address, options)
        )
        if self.token:
            channel = grpc.intercept_channel(channel, _SyncBearer(self.token))
        return channel

    def files_stamp(self) -> tuple[float, ...]:
        """Changes when the TLS files change: channels made before then are stale."""
        return _mtimes(self.tls) if self.tls.enabled else ()


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
):
    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return _SyncDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._metadata],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def client_security(args: argparse.Namespace) -> ChannelSecurity:
    """A client command's token (``--token-file``, else ``OMNI_TOKEN``) and TLS files."""
    tokens = read_tokens(getattr(args, "token_file", None), os.environ.get("OMNI_TOKEN"))
    return ChannelSecurity(token=tokens[0] if tokens else None, tls=TlsFiles.from_args(args))


# -- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """Everything a server needs: its interceptor (None: auth off), TLS files, and how it
    dials peers."""

    interceptor: AuthInterceptor | None
    tls: TlsFiles
    outgoing: ChannelSecurity

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, roles: Sequence[str], outgoing_role: str
    ) -> ServerSecurity:
        tls = TlsFiles.from_args(args)
        interceptor = None
        if args.auth == "required":
            tokens = TokenTable.from_args(args, roles)
            if not tokens:
                files = ", ".join(f"--{r}-token-file" for r in roles)
                raise SecurityConfigError(
                    f"auth is required but no token is configured: give {files} (or "
                    f"OMNI_<ROLE>_TOKEN), or --auth off for a trusted local setup"
                )
            interceptor = AuthInterceptor(
                tokens, args.health_auth == "open", args.reflection_auth == "open"
            )
        outgoing = ChannelSecurity(token=token_for(outgoing_role, args), tls=tls)
        if args.auth == "required" and not outgoing.token:
            raise SecurityConfigError(
                f"auth is required but no {outgoing_role} token to present to peers: "
                f"--{outgoing_role}-token-file or OMNI_{outgoing_role.upper()}_TOKEN"
            )
        return cls(interceptor, tls, outgoing)

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
        return [self.interceptor] if self.interceptor else []
