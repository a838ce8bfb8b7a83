"""What routes take from the app and the request, as `Annotated` dependencies, so that a
route's signature reads as what it needs: `key: KeyDep, settings: SettingsDep`."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from exporter.access.keys import ApiKey, authenticate
from exporter.db.pool import Databases
from exporter.errors import Unauthorized
from exporter.http.exports import ActiveExports
from exporter.http.refusals import UnauthenticatedRefusals
from exporter.settings import Settings


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _databases(request: Request) -> Databases:
    databases: Databases = request.app.state.databases
    return databases


def _active_exports(request: Request) -> ActiveExports:
    active: ActiveExports = request.app.state.active_exports
    return active


SettingsDep = Annotated[Settings, Depends(_settings)]
ActiveDep = Annotated[ActiveExports, Depends(_active_exports)]
DatabasesDep = Annotated[Databases, Depends(_databases)]
_bearer = HTTPBearer(auto_error=False, description="An API key from `exporter keys create`.")


CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def _api_key(
    request: Request, databases: DatabasesDep, credentials: CredentialsDep
) -> ApiKey:
    return await checked_key(request, databases, credentials)


async def checked_key(
    request: Request, databases: Databases, credentials: HTTPAuthorizationCredentials | None
) -> ApiKey:
    """The request's key; a refusal (401) counted, for the server log, and never written to
    the export log (http/refusals.py says why)."""
    try:
        return await authenticated(databases, credentials)
    except Unauthorized:
        refusals: UnauthenticatedRefusals = request.app.state.unauthenticated
        refusals.refused(request.url.path, request.client.host if request.client else None)
        raise


async def authenticated(
    databases: Databases, credentials: HTTPAuthorizationCredentials | None
) -> ApiKey:
    if credentials is None:
        raise Unauthorized(
            "send Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"}
        )
    key = await authenticate(databases.state, credentials.credentials)
    if key is None:
        raise Unauthorized(
            "unknown, revoked or expired key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return key


KeyDep = Annotated[ApiKey, Depends(_api_key)]
