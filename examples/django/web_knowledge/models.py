"""The application's own data: crawled pages, the FAQ pairs generated from them, and
products. Ordinary managed models. Nothing here knows about embeddings: no signals, no
Celery tasks. kbsync's triggers see every write, whichever code path makes it."""

import uuid

from django.conf import settings
from django.db import models


class WebsitePage(models.Model):
    class CrawlStatus(models.TextChoices):
        PENDING = "pending"
        CRAWLING = "crawling"
        COMPLETED = "completed"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    url = models.TextField()
    title = models.TextField(blank=True, default="")
    content = models.TextField(blank=True, default="")
    crawl_status = models.CharField(
        max_length=16, choices=CrawlStatus.choices, default=CrawlStatus.PENDING
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)


class QAPair(models.Model):
    class GenerationStatus(models.TextChoices):
        PENDING = "pending"
        GENERATING = "generating"
        COMPLETED = "completed"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    page = models.ForeignKey(WebsitePage, on_delete=models.CASCADE, related_name="qa_pairs")
    question = models.TextField()
    answer = models.TextField(blank=True, default="")
    generation_status = models.CharField(
        max_length=16, choices=GenerationStatus.choices, default=GenerationStatus.PENDING
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)


class Product(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.TextField()
    description = models.TextField(blank=True, default="")
    price = models.DecimalField(max_digits=10, decimal_places=2, null=True, blank=True)
    currency = models.CharField(max_length=3, default="EUR")
    category = models.TextField(blank=True, default="")
    in_stock = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
