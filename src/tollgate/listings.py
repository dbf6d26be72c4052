"""Listing and info payloads (compatibility C47), built once per config snapshot."""

from __future__ import annotations

from typing import Any

from tollgate.config.schema import (
    Addon,
    Application,
    Assistant,
    Deployable,
    Features,
    Model,
)
from tollgate.routing.interfaces import advertised

CREATED_AT = 1672534800  # DIAL's constant created_at/updated_at for config deployments
OWNER = "organization-owner"


def features_payload(features: Features | None) -> dict[str, bool]:
    """All eleven flags, defaults filled in (compatibility C47)."""
    f = features or Features()
    return {
        "rate": f.rate_endpoint is not None,
        "tokenize": f.tokenize_endpoint is not None,
        "truncate_prompt": f.truncate_prompt_endpoint is not None,
        "configuration": f.configuration_endpoint is not None,
        "system_prompt": True if f.system_prompt_supported is None else f.system_prompt_supported,
        "tools": bool(f.tools_supported),
        "seed": bool(f.seed_supported),
        "url_attachments": bool(f.url_attachments_supported),
        "folder_attachments": bool(f.folder_attachments_supported),
        "allow_resume": True if f.allow_resume is None else f.allow_resume,
        "accessible_by_per_request_key": (
            True if f.accessible_by_per_request_key is None else f.accessible_by_per_request_key
        ),
    }


def inherit_features(own: Features | None, shared: Features | None) -> Features | None:
    """An assistant's features with unset values taken from `assistant.features`."""
    if shared is None:
        return own
    if own is None:
        return shared
    values = {
        name: getattr(own, name) if getattr(own, name) is not None else getattr(shared, name)
        for name in Features.model_fields
    }
    return Features(**values)


def _without_nulls(item: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in item.items() if value is not None}


def _common(name: str, item: Deployable, kind: str) -> dict[str, Any]:
    return {
        "id": name,
        kind: name,
        "display_name": item.display_name,
        "display_version": item.display_version,
        "icon_url": item.icon_url,
        "description": item.description,
        "reference": item.reference or name,
        "owner": OWNER,
        "object": kind,
        "status": "succeeded",
        "created_at": CREATED_AT,
        "updated_at": CREATED_AT,
    }


def _attachments_and_defaults(item: Deployable) -> dict[str, Any]:
    return {
        "input_attachment_types": item.input_attachment_types,
        "max_input_attachments": item.max_input_attachments,
        "defaults": item.defaults,
        "description_keywords": item.description_keywords,
    }


def model_item(name: str, model: Model) -> dict[str, Any]:
    item = _common(name, model, "model")
    item["features"] = features_payload(model.features)
    item.update(_attachments_and_defaults(model))
    item["lifecycle_status"] = model.lifecycle_status or "generally-available"
    item["capabilities"] = {
        "scale_types": ["standard"],
        "completion": model.type == "completion",
        "chat_completion": model.type == "chat",
        "embeddings": model.type == "embedding",
        "fine_tune": False,
        "inference": False,
    }
    item["tokenizer_model"] = model.tokenizer_model
    _with_interfaces(item, model, model.type)
    if model.limits is not None:
        item["limits"] = _without_nulls(
            {
                "max_total_tokens": model.limits.max_total_tokens,
                "max_prompt_tokens": model.limits.max_prompt_tokens,
                "max_completion_tokens": model.limits.max_completion_tokens,
            }
        )
    if model.pricing is not None:
        item["pricing"] = _without_nulls(
            {
                "unit": model.pricing.unit,
                "prompt": model.pricing.prompt,
                "completion": model.pricing.completion,
            }
        )
    return _without_nulls(item)


def deployment_item(name: str, model: Model) -> dict[str, Any]:
    """`/openai/deployments` entry. DIAL always printed default features here (a quirk we fix)."""
    return {
        "id": name,
        "model": name,
        "owner": OWNER,
        "object": "deployment",
        "status": "succeeded",
        "created_at": CREATED_AT,
        "updated_at": CREATED_AT,
        "scale_settings": {"scale_type": "standard"},
        "features": features_payload(model.features),
    }


def application_item(name: str, application: Application) -> dict[str, Any]:
    item = _common(name, application, "application")
    item["features"] = features_payload(application.features)
    item.update(_attachments_and_defaults(application))
    _with_interfaces(item, application, None)
    return _without_nulls(item)


def _with_interfaces(item: dict[str, Any], spec: Deployable, model_type: str | None) -> None:
    """`interfaces`: the API families served (compatibility C75), on deployments that declare
    typed interfaces or `responsesEndpoint`; the items of others keep DIAL's older shape."""
    if spec.interfaces or spec.responses_endpoint is not None:
        item["interfaces"] = list(advertised(spec, model_type))


def assistant_item(name: str, assistant: Assistant, shared: Features | None) -> dict[str, Any]:
    item = _common(name, assistant, "assistant")
    item["features"] = features_payload(inherit_features(assistant.features, shared))
    item["addons"] = list(assistant.addons)
    item.update(_attachments_and_defaults(assistant))
    return _without_nulls(item)


def addon_item(name: str, addon: Addon) -> dict[str, Any]:
    item = _common(name, addon, "addon")
    item["features"] = features_payload(None)  # DIAL lists addons with default features
    item["description_keywords"] = addon.description_keywords
    return _without_nulls(item)
