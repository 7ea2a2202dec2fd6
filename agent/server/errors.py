"""The server's exceptions, one tree::

    ServerError                  (agent.errors.AgentError)
    ├── ConfigError              bad flags, config file or database URL
    └── ApiError                 an API request that cannot be served; carries the
        │                        HTTP status and Losant's error ``type``
        ├── NotFound             404 "NotFound"
        ├── Validation           400 "Validation"
        ├── Unauthorized         401 "Unauthorized"
        ├── Forbidden            403 "Forbidden"
        ├── Conflict             409 "Conflict"
        ├── Unprocessable        422 "Unprocessable"
        └── TooLarge             413 "RequestTooLarge"

Route functions raise these; one handler turns them into Losant's ``{"type",
"message"}``, or Mender's ``{"error", "request_id"}`` under ``/api/management/``.
"""

from __future__ import annotations

from agent.errors import AgentError


class ServerError(AgentError):
    pass


class ConfigError(ServerError):
    pass


class ApiError(ServerError):
    status = 400
    type = "Error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ApiError):
    status = 404
    type = "NotFound"


class Validation(ApiError):
    status = 400
    type = "Validation"


class Unauthorized(ApiError):
    status = 401
    type = "Unauthorized"


class Forbidden(ApiError):
    status = 403
    type = "Forbidden"


class Conflict(ApiError):
    status = 409
    type = "Conflict"


class Unprocessable(ApiError):
    status = 422
    type = "Unprocessable"


class TooLarge(ApiError):
    status = 413
    type = "RequestTooLarge"
