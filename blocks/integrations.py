"""Prefect Blocks for AuraGateway, Hydra and Gemini: secrets stay SecretStr until a client is built.

get_client() hands the SecretStr itself to the client, which opens it only where it builds a
request (the bearer header) or the SDK client (the Gemini key); nothing here prints it.
"""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from fleet.clients.base import Dispatcher, QualityGate
from fleet.clients.gemini import GeminiExtractor
from fleet.settings import get_settings
from fleet.wiring import aura_dispatcher, hydra_gate


class AuraGatewayBlock(Block):
    """Where AuraGateway listens and the bearer token it expects."""

    _block_type_name: ClassVar[str] = "AuraGateway"
    _block_type_slug: ClassVar[str] = "fleet-aura-gateway"
    _description: ClassVar[str] = (
        "AuraGateway endpoint (spawn / dispatch / task poll) for the Fleet Evolution Engine."
    )

    url: str = Field(description="e.g. https://mac1.example:8001")
    token: SecretStr | None = Field(default=None, description="bearer token")
    allow_insecure: bool = Field(
        default=False,
        description="allow plain http:// to a non-loopback host"
        " (like FLEET_ALLOW_INSECURE_TRANSPORT=true)",
    )

    def get_client(self) -> Dispatcher:
        return aura_dispatcher(self.url, self.token, get_settings(), self.allow_insecure)


class HydraBlock(Block):
    """Where Hydra's status API listens and its bearer token."""

    _block_type_name: ClassVar[str] = "Hydra"
    _block_type_slug: ClassVar[str] = "fleet-hydra"
    _description: ClassVar[str] = (
        "Hydra quality-gate endpoint (GET /status/{app_id}) for the Fleet Evolution Engine."
    )

    url: str = Field(description="e.g. https://mac1.example:8095")
    token: SecretStr | None = Field(default=None, description="bearer token")
    allow_insecure: bool = Field(
        default=False, description="allow plain http:// to a non-loopback host"
    )

    def get_client(self) -> QualityGate:
        return hydra_gate(self.url, self.token, get_settings(), self.allow_insecure)


class GeminiBlock(Block):
    """Gemini API key and model for tier-2 extraction (the model is configuration, never code)."""

    _block_type_name: ClassVar[str] = "Gemini Extraction"
    _block_type_slug: ClassVar[str] = "fleet-gemini"
    _description: ClassVar[str] = "Gemini model and API key for PARSE tier-2 task extraction."

    api_key: SecretStr = Field(description="Gemini API key")
    model: str = Field(description="Gemini model name, e.g. the current Flash model")

    def get_client(self) -> GeminiExtractor:
        return GeminiExtractor(self.api_key, self.model)
