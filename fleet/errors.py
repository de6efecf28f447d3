"""Exceptions of the domain core: each says what failed and what to do about it."""

from __future__ import annotations


class FleetError(Exception):
    """Base class: an operator-facing failure with a readable message."""

    # Whether the engine's task retries may try again (one retry layer per call: errors a
    # client already retried at the transport level are not transient here).
    transient = False


class InvalidAppId(FleetError, ValueError):
    def __init__(self, value: object):
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "...'"
        super().__init__(
            f"invalid app id {shown} — app ids are 1–64 characters of [a-z0-9._-], "
            "starting with a letter or digit"
        )


class InvalidTransition(FleetError):
    """A stage write that the pipeline's state machine does not allow."""


class StaleLease(FleetError):
    """A write carried an epoch older than the current claim: another run owns the app."""


class StoreUnavailable(FleetError):
    """The store could not be reached or answered with an error."""

    transient = True


class DispatchError(FleetError):
    """A dispatched command failed; the message carries the cause."""


class DispatchTimeout(DispatchError):
    """A dispatched command did not finish within its timeout and was stopped."""


class AgentFailed(DispatchError):
    """The agent command ran and failed; a fresh attempt may succeed."""

    transient = True


class UnknownTask(DispatchError):
    """The dispatcher has no record of this task id (e.g. it restarted)."""


class QualityGateError(FleetError):
    """The quality gate could not report a status."""


class ConfigError(FleetError):
    """A configuration file or value is invalid; the message says where and why."""


class GatewayUnavailable(DispatchError):
    """AuraGateway could not be reached, kept failing through the transport's own retries,
    or its circuit breaker is open. The transport already retried: callers must not retry again."""


class QualityGateUnavailable(QualityGateError):
    """Hydra could not be reached, kept failing through the transport's own retries, or its
    circuit breaker is open. The transport already retried: callers must not retry again."""


class CircuitOpen(FleetError):
    """An endpoint's circuit breaker is open: calls are refused until its reset time has passed."""


class ExtractionError(FleetError):
    """Tier-2 extraction (Gemini) could not be called; the message says why and what to check."""


class StageFailed(FleetError):
    """A pipeline stage ended the app's run; the message becomes the state's `error`."""


class GuardError(FleetError):
    """The supervisor could not snapshot or restore a repository (git failed): an operator looks."""


class SupervisorStopped(FleetError):
    """The supervisor is in emergency stop: it refuses changes until an operator resumes it."""


class TmuxError(FleetError):
    """A tmux command failed (server gone, pane missing); the message names the command."""
