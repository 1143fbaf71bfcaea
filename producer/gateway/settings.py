"""The gateway's own settings (`GENQ_GATEWAY_*`), on top of the shared ones."""

from __future__ import annotations

import ipaddress

from pydantic import Field

from jobcontract.settings import GenqSettings


class GatewaySettings(GenqSettings):
    gateway_host: str = Field(default="127.0.0.1", description="Loopback only unless API keys are configured.")
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    gateway_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="JSON request bodies.")
    gateway_max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, description="Uploads to /v1/files.")
    gateway_api_keys: list[str] = Field(
        default_factory=list, description='Bearer keys callers must send (a JSON list: ["k1", "k2"]).'
    )
    gateway_max_wait_s: float = Field(default=300.0, gt=0, description="Longest wait on /v1/genq/jobs/{id}/result.")

    @property
    def loopback_only(self) -> bool:
        return not self.gateway_api_keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
