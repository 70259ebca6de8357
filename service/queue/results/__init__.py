"""Result stores: where finished images rest, chosen by ``--result-store``.

``memory`` and ``redis`` keep the images inside the job record (base64); ``file:///dir`` and
``s3://bucket/prefix`` keep them as objects, and the job record holds only their keys.
"""

from service.queue.results.base import (
    ImageMissing,
    ResultStore,
    StoreUnavailable,
    content_type,
    object_key,
    parse_object_key,
)
from service.queue.results.factory import open_result_store, result_store_url

__all__ = [
    "ImageMissing",
    "ResultStore",
    "StoreUnavailable",
    "content_type",
    "object_key",
    "open_result_store",
    "parse_object_key",
    "result_store_url",
]
