"""The tenant's manual prompt (a source), and the knowledge base kbsync keeps.

`TenantKnowledge` is unmanaged: kbsync creates and owns the table (`kbsync install`),
Django only reads it. Never write it from the application; edit the source rows and
kbsync follows."""

from django.conf import settings
from django.db import models
from pgvector.django import VectorField


class AIPrompts(models.Model):
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    manual_prompt = models.TextField(blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)


class TenantKnowledge(models.Model):
    id = models.BigAutoField(primary_key=True)
    tenant_id = models.TextField()
    # The source's name in kbsync.toml: faq, product, page, manual.
    source = models.TextField()
    # The source row's key as text (a QAPair's UUID, an AIPrompts' user id).
    source_key = models.TextField()
    chunk_index = models.IntegerField()
    content = models.TextField()
    content_hash = models.BinaryField()
    # The dimension is the configured model's (embedding.dimensions): kbsync's column.
    embedding = VectorField(null=True)
    embedding_model = models.TextField(null=True)
    metadata = models.JSONField(default=dict)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "tenant_knowledge"
