"""The one error type behind every refusal a client sees: a machine-readable code and a message for people.

The Wyoming handler sends `code` and `message` in an `error` event, the control API in its JSON body, and the
Home Assistant integration translates the code; each part raises a subclass that says where the error arose.
"""

from __future__ import annotations


class CodedError(Exception):
    """A refusal with a stable code (clients translate it) and a message that says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestError(CodedError):
    """A request the service cannot serve; the code goes to the client in a Wyoming `error` event."""
