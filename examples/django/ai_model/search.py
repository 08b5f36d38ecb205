"""Retrieval for the application: embed the question with the same provider and model
kbsync embeds the chunks with, then rank one tenant's chunks by cosine distance."""

import json
import os
import urllib.request

from django.conf import settings
from pgvector.django import CosineDistance

from .models import TenantKnowledge


def embed(text: str) -> list[float]:
    """One vector from the OpenAI-compatible embeddings API kbsync uses."""
    request = urllib.request.Request(
        settings.EMBEDDING_BASE_URL.rstrip("/") + "/embeddings",
        data=json.dumps({"model": settings.EMBEDDING_MODEL, "input": [text]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    if key := os.environ.get("OPENAI_API_KEY"):
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"][0]["embedding"]


def search(tenant, query: str, k: int = 5, source: str | None = None):
    """The `k` chunks of `tenant` closest to `query`, each with its `distance`."""
    chunks = TenantKnowledge.objects.filter(tenant_id=str(tenant)).exclude(embedding=None)
    if source is not None:
        chunks = chunks.filter(source=source)
    return list(
        chunks.annotate(distance=CosineDistance("embedding", embed(query))).order_by("distance")[:k]
    )
