"""The example's end-to-end check, run by `just test` (tests/django_example.rs) while a
real kbsync daemon syncs the same database: the application writes through the ORM in
every way Django writes, then reads the knowledge back through the unmanaged model.

    python -m scenario.orm_writes existing   (before `kbsync install`: the rows a shop
                                              already has when it adopts kbsync)
    python -m scenario.orm_writes            (then, with the daemon running; from
                                              examples/django; DATABASE_URL,
                                              EMBEDDING_BASE_URL, EMBEDDING_MODEL set)

What kbsync must hold is derived from the source rows alone, after each step; the check
waits for it (timed, KBSYNC_EXAMPLE_WAIT seconds, default 60), then fails naming every
difference. It prints one JSON line of facts the caller checks against the embedding
server's counters. Exit status 0 means every expectation held.
"""

import json
import os
import sys
import time
from decimal import Decimal

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.db import transaction  # noqa: E402

from ai_model.models import AIPrompts, TenantKnowledge  # noqa: E402
from ai_model.search import search  # noqa: E402
from web_knowledge.models import Product, QAPair, WebsitePage  # noqa: E402

WAIT_SECONDS = float(os.environ.get("KBSYNC_EXAMPLE_WAIT", "60"))


def expected() -> dict:
    """(source, key) -> (tenant, how its text must read), from the source rows, with
    the templates of examples/django/kbsync.toml. A product's text ends in its price
    as PostgreSQL prints it, so products are checked up to their category line."""
    out = {}
    for qa in QAPair.objects.filter(generation_status="completed").select_related("page"):
        text = f"Question: {qa.question}\nAnswer: {qa.answer}".strip()
        out[("faq", str(qa.id))] = (str(qa.page.user_id), "equals", text)
    for p in Product.objects.all():
        text = f"{p.name}\n{p.description}\nCategory: {p.category}\n"
        out[("product", str(p.id))] = (str(p.user_id), "starts", text)
    for page in WebsitePage.objects.filter(crawl_status="completed"):
        text = f"{page.title}\n\n{page.content}".strip()
        if text:
            out[("page", str(page.id))] = (str(page.user_id), "equals", text)
    for prompt in AIPrompts.objects.all():
        if prompt.manual_prompt.strip():
            out[("manual", str(prompt.user_id))] = (
                str(prompt.user_id),
                "equals",
                prompt.manual_prompt.strip(),
            )
    return out


def differences() -> list[str]:
    """What the knowledge base, read through the ORM, lacks or has too much of."""
    want = expected()
    have: dict = {}
    for chunk in TenantKnowledge.objects.order_by("source", "source_key", "chunk_index"):
        have.setdefault((chunk.source, chunk.source_key), []).append(chunk)
    problems = []
    for key in sorted(set(have) - set(want)):
        problems.append(f"{key}: chunks of a row that was removed or is not eligible")
    for key, (tenant, how, text) in sorted(want.items()):
        chunks = have.get(key)
        if not chunks:
            problems.append(f"{key}: no chunks")
            continue
        content = "".join(c.content for c in chunks)
        if any(c.tenant_id != tenant for c in chunks):
            problems.append(f"{key}: tenant {chunks[0].tenant_id!r}, expected {tenant!r}")
        if any(c.embedding is None for c in chunks):
            problems.append(f"{key}: a chunk without an embedding")
        if (how == "equals" and content != text) or (how == "starts" and not content.startswith(text)):
            problems.append(f"{key}: content {content!r} does not match {text!r}")
    return problems


def in_sync(after: str) -> None:
    """Wait until the knowledge base matches the source rows, or fail."""
    deadline = time.monotonic() + WAIT_SECONDS
    while (problems := differences()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if problems:
        sys.exit(
            f"after {after}, the knowledge base still differs from the source rows "
            f"{WAIT_SECONDS:.0f} s later (is the kbsync daemon running? are the capture "
            "triggers installed?):\n  " + "\n  ".join(problems)
        )
    print(f"in sync after {after}", file=sys.stderr)


def create_existing() -> None:
    """The shop's data as it stands before kbsync is installed."""
    alice = User.objects.create(username="alice")  # tenant of an outdoor shop
    bob = User.objects.create(username="bob")  # tenant of a bakery
    tents = WebsitePage.objects.create(
        user=alice,
        url="https://alpine.example/tents",
        title="Tents",
        content="Our tents are freestanding domes with two doors.",
        crawl_status="completed",
    )
    returns = WebsitePage.objects.create(
        user=alice,
        url="https://alpine.example/returns",
        title="Returns",
        content="Unused gear can be returned within 30 days.",
        crawl_status="completed",
    )
    WebsitePage.objects.create(user=alice, url="https://alpine.example/draft", title="Draft")
    bread = WebsitePage.objects.create(
        user=bob,
        url="https://crumb.example/bread",
        title="Bread",
        content="Our sourdough is leavened for 36 hours.",
        crawl_status="completed",
    )
    done = "completed"
    waterproof = QAPair.objects.create(
        page=tents, question="Are the tents waterproof?", answer="Yes, the fly is rated 3000 mm.",
        generation_status=done,
    )
    pitching = QAPair.objects.create(
        page=tents, question="How long does pitching a tent take?", answer="About five minutes.",
        generation_status=done,
    )
    refund = QAPair.objects.create(
        page=returns, question="When do I get my refund?", answer="Within a week of the return.",
        generation_status=done,
    )
    QAPair.objects.create(page=returns, question="Do you ship abroad?", generation_status="pending")
    gluten = QAPair.objects.create(
        page=bread, question="Is the sourdough gluten free?", answer="No, it is made with wheat.",
        generation_status=done,
    )
    stove = Product.objects.create(
        user=alice, name="Camping stove", description="Boils a litre in three minutes.",
        price=Decimal("69.00"), category="Cooking",
    )
    tent = Product.objects.create(
        user=alice, name="Two-person tent", description="A freestanding dome.",
        price=Decimal("289.00"), category="Shelter",
    )
    Product.objects.create(
        user=bob, name="Sourdough loaf", description="Naturally leavened.", price=Decimal("6.00"),
        category="Bread",
    )
    AIPrompts.objects.create(user=alice, manual_prompt="Answer as a friendly mountain guide.")


def main() -> None:
    if sys.argv[1:] == ["existing"]:
        create_existing()
        print("existing rows written", file=sys.stderr)
        return
    alice = User.objects.get(username="alice")
    returns = WebsitePage.objects.get(url="https://alpine.example/returns")
    waterproof = QAPair.objects.get(question="Are the tents waterproof?")
    pitching = QAPair.objects.get(question="How long does pitching a tent take?")
    refund = QAPair.objects.get(question="When do I get my refund?")
    gluten = QAPair.objects.get(question="Is the sourdough gluten free?")
    stove = Product.objects.get(name="Camping stove")
    bob = User.objects.get(username="bob")
    # Written before kbsync existed: `kbsync install` queued them, the daemon syncs them.
    in_sync("rows written before kbsync install")

    # An edit of a text field, through save().
    waterproof.answer = "Yes: the fly is rated 3000 mm and the floor 5000 mm."
    waterproof.save()
    # save() with nothing changed but updated_at (auto_now), and an edit of a column
    # that is metadata, not text: neither may cost an embedding call.
    pitching.save()
    stove.in_stock = False
    stove.save(update_fields=["in_stock", "updated_at"])
    # bulk_create: one INSERT of many rows.
    Product.objects.bulk_create(
        Product(
            user=bob, name=f"Seasonal bun {n}", description=f"A bun for week {n} of the season.",
            price=Decimal("2.50"), category="Pastry",
        )
        for n in range(1, 21)
    )
    # QuerySet.update: one UPDATE, no save(), no signal.
    Product.objects.filter(user=alice, category="Shelter").update(
        description="A freestanding dome with two doors and a full rain fly."
    )
    # A page deleted with its QAPairs (the ORM's cascade), in one transaction.
    with transaction.atomic():
        returns.delete()
    # A QAPair leaving `completed`.
    gluten.generation_status = "failed"
    gluten.save()
    AIPrompts.objects.filter(user=alice).update(manual_prompt="Answer as a patient mountain guide.")
    in_sync("save(), bulk_create, QuerySet.update, a cascaded delete and a status change")

    removed = {("faq", str(refund.id)), ("page", str(returns.id)), ("faq", str(gluten.id))}
    left = set(TenantKnowledge.objects.values_list("source", "source_key"))
    assert not removed & left, f"chunks of removed rows are still there: {removed & left}"

    hits = search(alice.id, waterproof.question, k=3)
    ranked = [(h.source, h.source_key, round(h.distance, 4)) for h in hits]
    assert hits and (hits[0].source, hits[0].source_key) == ("faq", str(waterproof.id)), (
        f"search for the edited FAQ's own question ranked {ranked}"
    )
    assert all(h.tenant_id == str(alice.id) for h in hits), f"another tenant's chunk: {ranked}"
    assert "5000 mm" in hits[0].content, f"the first hit is not the edited text: {hits[0].content!r}"
    print(f"search(alice, {waterproof.question!r}) ranked {ranked}", file=sys.stderr)

    print(json.dumps({
        "touched_question": pitching.question,
        "metadata_only_product": stove.name,
        "edited_answer": waterproof.answer,
        "bulk_created": 20,
    }))


if __name__ == "__main__":
    main()
