"""Prefect blocks for Kaiyuan Flows.

Register them with ``prefect block register -m blocks`` (or
``python -m deployments.setup``), create documents in the UI or in Python::

    RayCluster(address="auto", namespace="kaiyuan").save("prod-cluster")
    LanceStorage(endpoint="minio:9000", access_key_id="...",
                 secret_access_key="...", allow_http=True).save("minio")

and refer to them from a pipeline YAML by name::

    ray:
      block: prod-cluster           # address, init_kwargs, runtime_env, namespace
      storage_options: {block: minio}
    pipeline:
      type: LanceWriter
      storage_options: {block: minio}

Credentials are ``SecretStr``: Prefect stores them encrypted-at-rest in its
database, the UI and the API show them obfuscated, and the flow resolves them
only inside the run's processes (never into parameters, logs or artifacts).
"""

from __future__ import annotations

from typing import Any, Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class RayCluster(Block):
    """Where and how a Kaiyuan pipeline connects to Ray."""

    _block_type_name = "Kaiyuan Ray Cluster"
    _block_type_slug = "kaiyuan-ray-cluster"
    _description = "Ray cluster connection for Kaiyuan pipelines (address, ray.init kwargs, runtime env, namespace)."

    address: Optional[str] = Field(
        default=None, description="Ray address: 'auto' inside a cluster, 'ray://host:10001', or empty for a local Ray."
    )
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for ray.init.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime environment.")
    namespace: Optional[str] = Field(default=None, description="Ray namespace.")

    def ray_settings(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "init_kwargs": dict(self.init_kwargs),
            "runtime_env": dict(self.runtime_env),
            "namespace": self.namespace,
        }


class LanceStorage(Block):
    """Object-store options for Lance datasets (S3, MinIO, ...)."""

    _block_type_name = "Kaiyuan Lance Storage"
    _block_type_slug = "kaiyuan-lance-storage"
    _description = "Object-store endpoint and credentials for Lance datasets read and written by Kaiyuan pipelines."

    endpoint: Optional[str] = Field(default=None, description="S3-compatible endpoint, e.g. http://minio:9000.")
    region: Optional[str] = Field(default=None, description="Region, e.g. us-east-1.")
    allow_http: Optional[bool] = Field(default=None, description="Allow plain-HTTP endpoints.")
    access_key_id: Optional[SecretStr] = Field(default=None, description="Access key id.")
    secret_access_key: Optional[SecretStr] = Field(default=None, description="Secret access key.")
    session_token: Optional[SecretStr] = Field(default=None, description="Session token (temporary credentials).")
    extra_options: dict[str, str] = Field(default_factory=dict, description="Further Lance storage options (not secret).")

    def storage_options(self) -> dict[str, str]:
        """Lance ``storage_options`` (SPEC §4 names), secrets revealed. Only
        for passing to Lance / pyarrow inside a run; never log the result."""
        opts: dict[str, str] = dict(self.extra_options)
        endpoint = self.endpoint
        if endpoint:
            if "://" not in endpoint:
                endpoint = ("https://" if self.allow_http is False else "http://") + endpoint
            opts["aws_endpoint"] = endpoint
        if self.region:
            opts["aws_region"] = self.region
        for key, secret in (
            ("aws_access_key_id", self.access_key_id),
            ("aws_secret_access_key", self.secret_access_key),
            ("aws_session_token", self.session_token),
        ):
            if secret is not None and secret.get_secret_value():
                opts[key] = secret.get_secret_value()
        if self.allow_http is not None:
            opts["aws_allow_http"] = "true" if self.allow_http else "false"
        elif endpoint and endpoint.startswith("http://"):
            opts["aws_allow_http"] = "true"
        return opts


__all__ = ["RayCluster", "LanceStorage", "apply_ray_block", "storage_options_for"]


# ---------------------------------------------------------------------------
# Resolution by name, used by the flow (flows/pipeline.py).

def storage_options_for(name: str) -> dict[str, str]:
    """Lance storage options from the LanceStorage block ``name``, loaded now.
    Not cached here: ``tasks.storage.block_options`` keeps them for a TTL, so
    a long-lived Ray worker sees a rotated block."""
    return LanceStorage.load(name).storage_options()


def apply_ray_block(ray_section) -> None:
    """Fill a config's ``ray:`` section from its RayCluster block: the block's
    address, init_kwargs, runtime_env and namespace apply where the YAML did
    not set them."""
    block = RayCluster.load(ray_section.block)
    explicit = ray_section.model_fields_set
    for name, value in block.ray_settings().items():
        if name not in explicit and value not in (None, {}):
            setattr(ray_section, name, value)
