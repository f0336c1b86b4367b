"""Request bodies the API accepts, validated with pydantic at the edge, turned into model specs."""

from capsa.api.schemas.fields import TemplateDefaults
from capsa.api.schemas.template import TemplateError, parse_create_body

__all__ = ["TemplateDefaults", "TemplateError", "parse_create_body"]
