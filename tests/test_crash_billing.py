"""Every answer a client received is charged exactly once, even when the gateway is killed."""

from __future__ import annotations

import fcntl
import threading
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from django.conf import settings

from billing.models import CreditTransaction
from gateway.journal import Journal
from tests.conftest import HELLO, GatewayProcess, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
CONCURRENCY = 4


def test_a_killed_gateway_loses_no_charge(world, user_with_credits, make_key):
    secret = make_key(user_with_credits)
    answered: list[int] = []
    stop = threading.Event()

    def load(url: str) -> None:
        client = openai.OpenAI(base_url=f"{url}/ai/v1", api_key=secret, max_retries=0, timeout=10)
        while not stop.is_set():
            try:
                client.chat.completions.create(model="gpt-test", messages=HELLO)
            except openai.APIError:
                return  # the gateway is gone
            answered.append(1)

    # A flush interval longer than the test: every charge is still only in the journal when it dies.
    with GatewayProcess(GATEWAY_ACCOUNTING_FLUSH_MS="600000") as gateway:
        threads = [threading.Thread(target=load, args=(gateway.url,)) for _ in range(CONCURRENCY)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(answered) >= 40, timeout=30)
        gateway.kill()
        stop.set()
        for thread in threads:
            thread.join(15)
    received = len(answered)
    assert CreditTransaction.objects.filter(user=user_with_credits, kind="usage").count() == 0

    # The next process to start writes the dead one's journal.
    with GatewayProcess():
        charged = wait_for(
            lambda: (
                CreditTransaction.objects.filter(user=user_with_credits, kind="usage").count() >= received
                and CreditTransaction.objects.filter(user=user_with_credits, kind="usage").count()
            ),
            timeout=30,
        )
    # Never fewer than the answers received; more only by calls cut off in flight by the kill.
    assert received <= charged <= received + CONCURRENCY
    assert not list(Path(settings.GATEWAY_JOURNAL_DIR).glob("*.jsonl"))


def test_a_journal_held_by_a_live_process_is_not_taken(tmp_path):
    ours, other = Journal(tmp_path, "ours"), Journal(tmp_path, "other")
    other.append(_Line(1))
    assert list(ours.orphans()) == []  # its writer holds the lock
    other.seal()
    assert list(ours.orphans()) == []  # sealed but not yet written: still held
    os_close_all(other)  # the writer dies: the kernel lets go of its locks
    (orphan,) = ours.orphans()
    assert list(orphan.lines()) == [{"n": 1}]
    orphan.remove()
    assert list(ours.orphans()) == []


def test_a_line_cut_short_by_a_crash_is_not_read(tmp_path):
    journal = Journal(tmp_path, "p")
    journal.append(_Line(1))
    (segment,) = journal.seal()
    with open(segment.path, "ab") as file:
        file.write(b'{"n": 2')
    assert list(segment.lines()) == [{"n": 1}]


@dataclass
class _Line:
    n: int


def os_close_all(journal: Journal) -> None:
    import os

    for segment in journal.sealed:
        os.close(segment.fd)
    journal.sealed.clear()


def test_a_journal_of_another_database_is_never_taken(tmp_path):
    dead = Journal(tmp_path, "dead", database="other")
    dead.append(_Line(1))
    dead.seal()
    os_close_all(dead)  # its writer is gone: nobody holds it
    assert list(Journal(tmp_path, "ours", database="ours").orphans()) == []
    assert len(list(Journal(tmp_path, "next", database="other").orphans())) == 1


def test_a_segment_being_created_is_never_taken_for_an_orphan(tmp_path, monkeypatch):
    # Another process's drainer looks at the directory in the moment between the segment's
    # creation and its lock: it must not see a segment nobody holds.
    ours, drainer = Journal(tmp_path, "ours"), Journal(tmp_path, "drainer")
    taken = []
    flock = fcntl.flock

    def drain_first(fd: int, operation: int) -> None:
        monkeypatch.setattr(fcntl, "flock", flock)  # the drainer's own locks are real
        taken.extend(drainer.orphans())
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", drain_first)
    ours.append(_Line(1))
    assert taken == []
    (segment,) = ours.seal()
    assert segment.path.suffix == ".jsonl" and list(segment.lines()) == [{"n": 1}]
