"""Credit admission: a balance that covers N calls serves N, whatever the timing and the concurrency."""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal

import openai
import pytest
from django.conf import settings

from accounts.models import ApiKey
from billing.models import Balance, price_tokens, to_picos
from billing.services import create_user
from gateway import budget
from gateway.accounting import accountant
from gateway.ledger_cache import ACCOUNT_TTL_SECONDS, PROCESS, MemoryCache, RedisCache, Seed, ledger_cache
from tests.conftest import HELLO, PRICE_IN, PRICE_OUT, GatewayProcess, wait_for
from tests.upstream import COMPLETION_TOKENS, PROMPT_TOKENS

pytestmark = pytest.mark.django_db(transaction=True)
COST = (PRICE_IN * PROMPT_TOKENS + PRICE_OUT * COMPLETION_TOKENS) / Decimal(1_000_000)


def statuses(world, secret: str, calls: int, concurrency: int, **body) -> list[int]:  # type: ignore[no-untyped-def]
    client = world.client(secret)

    def one(_: int) -> int:
        try:
            client.chat.completions.create(model="gpt-test", messages=HELLO, **body)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(calls)))


@pytest.fixture
def covers_three(world, make_key):  # type: ignore[no-untyped-def]
    """A user whose balance covers exactly three calls, and a key of theirs."""
    user = create_user("carol", credits=3 * COST, groups=["research"])
    return user, make_key(user)


def balance_of(user) -> Decimal:  # type: ignore[no-untyped-def]
    accountant.flush()
    return Balance.objects.amount_of(user)


def test_sequential_calls_serve_exactly_what_the_balance_covers(world, covers_three):
    user, secret = covers_three
    # Far faster than the usage writer's flush: the gate must see charges not yet written.
    assert statuses(world, secret, 6, 1) == [200, 200, 200, 402, 402, 402]
    assert balance_of(user) == 0


def test_concurrent_calls_overspend_by_at_most_the_calls_in_flight(world, covers_three):
    user, secret = covers_three
    concurrency = 16
    served = statuses(world, secret, 40, concurrency).count(200)
    assert 3 <= served <= 3 + concurrency
    assert balance_of(user) == 3 * COST - served * COST
    assert statuses(world, secret, 1, 1) == [402]


def test_with_max_tokens_on_every_call_the_balance_never_goes_below_zero(world, covers_three):
    user, secret = covers_three
    served = statuses(world, secret, 40, 16, max_tokens=COMPLETION_TOKENS).count(200)
    assert served >= 1
    assert balance_of(user) >= 0


def test_calls_held_in_flight_keep_their_reservation(world, covers_three):
    """Bounded calls held at the upstream: each holds its worst case, so the fourth finds no room."""
    _, secret = covers_three
    client = world.client(secret)
    with ThreadPoolExecutor(2) as pool:
        held = [
            pool.submit(client.chat.completions.create, model="held", messages=HELLO, max_tokens=COMPLETION_TOKENS)
            for _ in range(2)
        ]
        wait_for(lambda: world.upstream.in_flight == 2)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=3 * COMPLETION_TOKENS)
        world.upstream.release.set()
        assert all(call.result() for call in held)
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "insufficient_credits"


def test_a_grant_reaches_admission_at_once(world, covers_three):
    from billing.services import grant_credits

    user, secret = covers_three
    assert statuses(world, secret, 4, 1)[-1] == 402
    grant_credits(user, COST)
    assert statuses(world, secret, 2, 1) == [200, 402]


def test_a_key_spend_limit_is_402_with_its_reset_time(world, user_with_credits, make_key):
    secret = make_key(user_with_credits, name="capped")
    key = ApiKey.objects.get(name="capped")
    key.spend_limit, key.spend_window = 2 * COST, "day"
    key.save()
    client = world.client(secret)
    wait_for(lambda: statuses(world, secret, 1, 1) == [402], timeout=15)  # the snapshot learns of the limit
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-test", messages=HELLO)
    tomorrow = budget.window_of("day", datetime.now(UTC))[1]
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "spend_limit_exceeded"
    assert refused.value.body["message"] == (
        f"This API key has reached its spend limit of {2 * COST:f} credits per day. "
        f"It resets at {tomorrow:%Y-%m-%dT%H:%M:%S}Z."
    )
    # Another key of the same user still spends.
    assert statuses(world, make_key(user_with_credits), 1, 1) == [200]


# --- the rules, one by one -------------------------------------------------------------------------


def test_a_reservation_is_the_worst_case_when_bounded(world):
    from gateway.snapshot import get_snapshot

    model = get_snapshot().models["gpt-test"]
    body = {"model": "gpt-test", "messages": HELLO, "max_tokens": 100}
    nanos, bounded = budget.reservation(model, "realtime", body, 400)
    assert bounded and nanos == budget.to_nanos((PRICE_IN * 101 + PRICE_OUT * 100) / Decimal(1_000_000))
    nanos, bounded = budget.reservation(model, "realtime", {"model": "gpt-test"}, 400)
    assert not bounded and nanos == budget.to_nanos(PRICE_IN * 101 / Decimal(1_000_000))


def test_admission_prices_in_integers_exactly_as_the_ledger_does_in_decimal():
    """The integer estimate rounds like the ledger's Decimal (half to even, to the nano-credit):
    a rounding of its own (half up, truncation) or a lost price digit fails here."""
    rng = random.Random(9)
    prices = [Decimal(0), Decimal("0.000001"), Decimal("0.0005"), Decimal("0.0015"), Decimal("0.5"), Decimal("1.5")]
    prices += [Decimal(rng.randrange(10**13)).scaleb(-rng.randrange(7)) for _ in range(60)]
    tokens = [0, 1, 2, 3, 7, 1000, 4096, 128_000, 10**7, *(rng.randrange(10**6) for _ in range(20))]
    for input_price in prices:
        for output_price in rng.sample(prices, 8):
            picos = (to_picos(input_price), to_picos(output_price))
            for input_tokens in tokens:
                output_tokens = rng.choice(tokens)
                exact = price_tokens(input_price, output_price, input_tokens, output_tokens)
                assert budget.price_nanos(picos, input_tokens, output_tokens) == budget.to_nanos(exact), (
                    input_price,
                    output_price,
                    input_tokens,
                    output_tokens,
                )


def test_a_price_with_more_than_six_decimals_is_refused_not_rounded():
    with pytest.raises(ValueError):
        to_picos(Decimal("0.0000001"))


@pytest.mark.parametrize(
    ("window", "now", "start", "end"),
    [
        (
            "day",
            datetime(2026, 12, 31, 23, 59, tzinfo=UTC),
            datetime(2026, 12, 31, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            "week",
            datetime(2026, 12, 2, 8, tzinfo=UTC),
            datetime(2026, 11, 30, tzinfo=UTC),
            datetime(2026, 12, 7, tzinfo=UTC),
        ),
        (
            "month",
            datetime(2026, 12, 15, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            "month",
            datetime(2027, 2, 28, 12, tzinfo=UTC),
            datetime(2027, 2, 1, tzinfo=UTC),
            datetime(2027, 3, 1, tzinfo=UTC),
        ),
    ],
)
def test_spend_windows_are_utc_calendar_windows(window, now, start, end):
    assert budget.window_of(window, now) == (start, end)


@pytest.fixture(params=["memory", "redis"])
def credit_cache(request):  # type: ignore[no-untyped-def]
    if request.param == "memory":
        return MemoryCache()
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    return RedisCache(settings.REDIS_URL, f"{settings.REDIS_PREFIX}:test:{uuid.uuid4().hex}")


def test_the_cache_admits_while_room_is_left_and_a_newer_base_wins(credit_cache):
    cache = credit_cache
    seed = Seed("u1", 1, 100)
    assert cache.reserve([seed], 60, 0) is None
    assert cache.reserve([seed], 60, 0) is None  # unbounded: room was left (40)
    assert cache.reserve([seed], 60, 0) is not None  # nothing left
    cache.move("u1", reserved=-120, recorded=100)  # both calls cost 50
    assert cache.reserve([seed], 1, 0) is not None
    cache.seen(Seed("u1", 0, 1_000))  # an older version changes nothing
    assert cache.reserve([seed], 1, 0) is not None
    cache.seen(Seed("u1", 2, 150))  # the charges are written and 150 credited: 150 - 100 recorded
    assert cache.reserve([seed], 1, 60) is not None  # a bound of 60 does not fit in 50
    assert cache.reserve([seed], 1, 50) is None
    if isinstance(cache, RedisCache):  # an account no process touches any more goes in time
        assert 0 < cache.sync.ttl(cache.prefix + "u1") <= ACCOUNT_TTL_SECONDS


@pytest.mark.skipif(not settings.REDIS_URL, reason="credits in Redis (set REDIS_URL)")
def test_an_account_made_in_redis_is_made_with_its_lifetime():
    cache = RedisCache(settings.REDIS_URL, f"{settings.REDIS_PREFIX}:test:{uuid.uuid4().hex}")
    cache.seen(Seed("seeded", 1, 100))
    assert cache.reserve([Seed("reserved", 1, 100)], 10, 0) is None
    for account in ("seeded", "reserved"):
        assert 0 < cache.sync.ttl(cache.prefix + account) <= ACCOUNT_TTL_SECONDS


def test_a_refusal_names_the_account_that_refused():
    cache = MemoryCache()
    refusal = cache.reserve([Seed("u1", 1, 100), Seed("k1", 0, 10)], 20, 20)
    assert refusal is not None and refusal.account == "k1"
    assert cache.reserve([Seed("u1", 1, 100)], 100, 100) is None  # nothing was held by the refused call


@pytest.mark.skipif(not settings.REDIS_URL, reason="two processes share credits through Redis (set REDIS_URL)")
def test_two_processes_sharing_redis_overspend_by_at_most_the_calls_in_flight(world, make_key):
    user = create_user("dave", credits=10 * COST, groups=["research"])
    secret = make_key(user)
    per_process = 4
    with GatewayProcess(GATEWAY_ACCOUNTING_FLUSH_MS="600000") as other:
        clients = [world.client(secret), openai.OpenAI(base_url=f"{other.url}/ai/v1", api_key=secret, max_retries=0)]

        def one(index: int) -> int:
            try:
                clients[index % 2].chat.completions.create(model="gpt-test", messages=HELLO)
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code

        with ThreadPoolExecutor(2 * per_process) as pool:
            served = list(pool.map(one, range(80))).count(200)
    assert 10 <= served <= 10 + 2 * per_process


def test_while_redis_is_unreachable_credits_are_counted_in_memory():
    cache = RedisCache("redis://127.0.0.1:1/0", "unreachable")
    seed = Seed("u1", 1, 100)
    assert cache.reserve([seed], 60, 0) is None
    assert cache.reserve([seed], 60, 0) is None
    assert cache.reserve([seed], 1, 0) is not None  # the bound still holds, in this process
    cache.move("u1", reserved=-120)
    assert cache.reserve([seed], 1, 0) is None


def test_moves_redis_cannot_take_are_made_in_memory():
    cache = RedisCache("redis://127.0.0.1:1/0", "unreachable")
    cache.moves([("u1", 0, 500), ("u2", 30, 7), ("u1", 0, -200)])
    assert (cache.local.accounts["u1"][2:], cache.local.accounts["u2"][2:]) == ([300, 0], [7, 30])


def unseen_users(count: int) -> list[int]:
    """User ids no test creates: their accounts in the shared cache are this test's alone."""
    first = 10**9 + random.randrange(10**8)
    return list(range(first, first + count))


@pytest.mark.skipif(bool(settings.REDIS_URL), reason="credits in this process's memory (unset REDIS_URL)")
def test_in_memory_a_flush_takes_off_only_what_this_process_recorded():
    cache = ledger_cache()
    assert isinstance(cache, MemoryCache)
    (user,) = unseen_users(1)
    account = budget.user_account(user)
    cache.move(account, recorded=10_000)  # what this process's calls recorded as they ended

    budget.written([(user, 100, PROCESS)] * 40 + [(user, 999, "another-process"), (user, 0, PROCESS)])

    assert cache.accounts[account][2] == 10_000 - 40 * 100


@pytest.mark.skipif(not settings.REDIS_URL, reason="credits in Redis (set REDIS_URL)")
def test_a_flush_moves_each_users_credits_once_by_their_sum_in_one_round_trip():
    cache = ledger_cache()
    assert isinstance(cache, RedisCache)
    users = unseen_users(2)
    keys = [cache.prefix + budget.user_account(user) for user in users]
    cache.moves([(budget.user_account(user), 0, 10**6) for user in users])
    # In Redis every process's records were recorded there: the writer takes them all off.
    records = [(users[0], 1_000 + n, PROCESS if n % 2 else "another-process") for n in range(50)]
    records += [(users[1], 7, PROCESS)] * 3 + [(users[0], 0, PROCESS)]
    first_total = sum(nanos for user, nanos, _ in records if user == users[0])

    try:
        with cache.sync.monitor() as monitor:
            budget.written(records)
            end = f"end-{uuid.uuid4().hex}"
            cache.sync.echo(end)
            seen = []  # every command Redis ran meanwhile, from any client, in the order it ran them
            while (command := monitor.next_command())["command"] != f"ECHO {end}":
                seen.append(command)
        ours = [c for c in seen if any(key in c["command"] for key in keys)]
        sent = [c["command"].split()[0] for c in ours if c["client_type"] != "lua"]
        moved = [c["command"] for c in ours if c["client_type"] == "lua" and c["command"].startswith("HINCRBY")]
        assert sent == ["EVALSHA"]
        assert moved == [f"HINCRBY {keys[0]} s {-first_total}", f"HINCRBY {keys[1]} s -21"]
        assert [int(cache.sync.hget(key, "s") or 0) for key in keys] == [10**6 - first_total, 10**6 - 21]
    finally:
        cache.sync.delete(*keys)
