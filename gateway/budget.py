"""Credit admission: a paid call is admitted only while the money already committed leaves room.

Committed means charged in the database, priced but not yet written, or reserved by calls in
flight — in any process (see gateway.ledger_cache). A call reserves its worst-case cost when that is
bounded (the input estimated from the body, plus its output bound at the tier's output price)
and the input estimate otherwise; when it ends, :func:`settle` puts its exact cost in place of
the reservation, which stays committed until the usage writer has charged it (:func:`written`).

Two accounts may bound a call: its user's balance (→ 402 ``insufficient_credits``) and its key's
spend limit for the current UTC day, week or month (→ 402 ``spend_limit_exceeded``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from django.conf import settings
from django.db.models import Sum
from django.http import HttpResponse
from django.utils import timezone

from accounts.models import SpendWindow
from billing.models import Balance
from common.numbers import plain_decimal
from gateway import errors
from gateway.call import GatewayCall
from gateway.counters import Credits
from gateway.db import in_thread
from gateway.ledger_cache import PROCESS, MemoryCache, Move, Refusal, Seed, ledger_cache
from gateway.models import RequestLog
from gateway.snapshot import KeyEntry, ModelEntry

logger = logging.getLogger(__name__)
NANOS_PER_CREDIT = 10**9
OUTPUT_BOUNDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def to_nanos(amount: Decimal) -> int:
    return int(amount * NANOS_PER_CREDIT)  # amounts are exact to the nano-credit


def estimate_input_tokens(body_bytes: int) -> int:
    """Never much below the truth: a token is rarely shorter than four bytes of JSON."""
    return body_bytes // 4 + 1


def output_bound(body: dict[str, Any], model: ModelEntry) -> int | None:
    for name in OUTPUT_BOUNDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return model.max_output_tokens


def price_nanos(prices: tuple[int, int], input_tokens: int, output_tokens: int) -> int:
    """Tokens at (input, output) pico-credits per token, in nano-credits: the same as
    ``to_nanos(billing.models.price_tokens(...))`` (half to even), in integers, without a Decimal."""
    nanos, rest = divmod(prices[0] * input_tokens + prices[1] * output_tokens, 1000)
    return nanos + 1 if rest > 500 or (rest == 500 and nanos % 2) else nanos


def reservation(model: ModelEntry, tier: str, body: dict[str, Any], body_bytes: int) -> tuple[int, bool]:
    """A call's reservation in nano-credits, and whether it bounds the call's cost."""
    bound = output_bound(body, model)
    return price_nanos(model.prices[tier], estimate_input_tokens(body_bytes), bound or 0), bound is not None


# --- accounts -------------------------------------------------------------------------------------


def user_account(user_id: int) -> str:
    return f"u{user_id}"


def window_of(window: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar window (day, week from Monday, month) holding `now`: its start and its end."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if window == SpendWindow.DAY:
        return day, day + timedelta(days=1)
    if window == SpendWindow.WEEK:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    return start, (start + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True, slots=True)
class KeyWindow:
    key_id: int
    limit: Decimal
    window: str
    start: datetime
    end: datetime

    @property
    def account(self) -> str:
        # The limit is part of the name: a changed limit starts over from what the database has.
        return f"k{self.key_id}:{int(self.start.timestamp())}:{to_nanos(self.limit)}"


def key_window(key: KeyEntry, now: datetime | None = None) -> KeyWindow | None:
    if key.spend_limit is None or not key.spend_window:
        return None
    start, end = window_of(key.spend_window, now or timezone.now())
    return KeyWindow(key.id, key.spend_limit, key.spend_window, start, end)


class _Seeds:
    """What this process knows of each account's base: balances (loaded once, then every change
    as it is committed here or seen by the poll) and keys' spend in their current window."""

    def __init__(self) -> None:
        self.balances: dict[int, tuple[int, int]] | None = None
        self.windows: dict[str, int] = {}
        self.polled_at: datetime | None = None
        self.poller: asyncio.Task[None] | None = None

    def balance(self, user_id: int) -> Seed:
        version, base = (self.balances or {}).get(user_id, (0, 0))
        return Seed(user_account(user_id), version, base)

    def load(self) -> None:
        """All balances (first use), then those changed since the last poll (a small indexed read)."""
        now = timezone.now()
        rows = Balance.objects.all()
        if self.polled_at is not None and self.balances is not None:
            rows = rows.filter(updated_at__gte=self.polled_at - timedelta(seconds=2))
        found = {
            user_id: (version, to_nanos(amount))
            for user_id, version, amount in rows.values_list("user_id", "version", "amount")
        }
        if self.balances is None:
            self.balances = found
        else:
            for user_id, (version, base) in found.items():
                balance_seen(user_id, version, base)
        self.polled_at = now

    def window(self, window: KeyWindow) -> Seed | None:
        base = self.windows.get(window.account)
        return None if base is None else Seed(window.account, 0, base)

    def load_window(self, window: KeyWindow) -> Seed:
        spent = RequestLog.objects.filter(api_key_id=window.key_id, created_at__gte=window.start).aggregate(
            total=Sum("cost")
        )["total"] or Decimal(0)
        self.windows[window.account] = to_nanos(window.limit - spent)
        return Seed(window.account, 0, self.windows[window.account])

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(settings.GATEWAY_SNAPSHOT_POLL_SECONDS)
            try:
                await in_thread(self.load)
            except Exception as exc:
                logger.warning("Could not read changed balances; keeping the known ones: %s", exc)


_seeds = _Seeds()


def balance_seen(user_id: int, version: int, base: int) -> None:
    """A balance as committed (by this process, or seen by the poll): newer versions replace older."""
    balances = _seeds.balances
    if balances is not None and balances.get(user_id, (-1, 0))[0] < version:
        balances[user_id] = (version, base)
    ledger_cache().seen(Seed(user_account(user_id), version, base))


async def _seeds_for(call: GatewayCall) -> tuple[list[Seed], KeyWindow | None]:
    if _seeds.balances is None:
        await in_thread(_seeds.load)
    loop = asyncio.get_running_loop()
    if _seeds.poller is None or _seeds.poller.done() or _seeds.poller.get_loop() is not loop:
        _seeds.poller = loop.create_task(_seeds.watch())
    seeds = [_seeds.balance(call.key.user_id)]
    window = key_window(call.key)
    if window is not None:
        seed = _seeds.window(window)
        seeds.append(seed if seed is not None else await in_thread(_seeds.load_window, window))
    return seeds, window


# --- admission and settlement ------------------------------------------------------------------


@dataclass(slots=True)
class Hold:
    """What an admitted call holds: its reservation on each of its accounts."""

    accounts: tuple[str, ...]
    nanos: int


def refusal_response(call: GatewayCall, refusal: Refusal, window: KeyWindow | None) -> HttpResponse:
    if window is not None and refusal.account == window.account:
        return errors.spend_limit_reached(plain_decimal(window.limit), window.window, window.end)
    return errors.denied(errors.BALANCE_TOO_LOW, call.requested_alias)


async def credits_for(call: GatewayCall, *, hold: bool = True) -> tuple[Credits, KeyWindow | None] | None:
    """What a paid call reserves on its accounts (with ``hold=False``, only the room it must find),
    and its key's spend window; None when its model is free at its tier."""
    model = call.served
    if call.tier not in model.paid_tiers:
        return None
    nanos, bounded = reservation(model, call.tier, call.body, call.body_bytes)
    seeds, window = await _seeds_for(call)
    return Credits(seeds, nanos if hold else 0, nanos if bounded else 0), window


def take_hold(call: GatewayCall, credits: Credits) -> None:
    """The call was admitted: it holds its reservation until it is settled."""
    if credits.nanos:
        call.hold = Hold(tuple(seed.account for seed in credits.seeds), credits.nanos)


def cost_nanos(model: ModelEntry, tier: str, tokens: tuple[int | None, int | None]) -> int:
    """The exact cost of the tokens a call used, at the tier's current price (none: nothing)."""
    if tokens[0] is None or tier not in model.prices:
        return 0
    return price_nanos(model.prices[tier], tokens[0], tokens[1] or 0)


def _moves(hold: Hold, charged: int, *, written: bool) -> list[Move]:
    """(account, reserved change, recorded change) that replace a hold by its exact charge. The user's
    account records the charge until it is written; a key window keeps it for the window."""
    return [
        (account, -hold.nanos, 0 if written and index == 0 else charged) for index, account in enumerate(hold.accounts)
    ]


def settle(call: GatewayCall, tokens: tuple[int | None, int | None] = (None, None)) -> tuple[int, list[Move]]:
    """Replace a call's reservation by the exact cost of the tokens it used (none: it costs
    nothing): that cost in nano-credits, committed on the user's account until written, and the
    moves of its accounts that do it (the caller sends them, gateway.admission)."""
    held, call.hold = call.hold, None
    if held is None:
        return 0, []
    charged = cost_nanos(call.served, call.tier, tokens)
    return charged, _moves(held, charged, written=False)


# --- queued calls: reserved by the worker that runs them ------------------------------------------


def reserve_job(
    model: ModelEntry, tier: str, body: dict[str, Any], user_id: int, balance: tuple[int, int], key: KeyEntry | None
) -> Hold | Refusal | None:
    """Reserve a queued call's credits as a worker starts it, against its owner's balance as just
    read (version, nano-credits); None when its model is free at its tier."""
    if tier not in model.paid_tiers:
        return None
    nanos, bounded = reservation(model, tier, body, len(orjson.dumps(body)))
    seeds = [Seed(user_account(user_id), *balance)]
    window = key_window(key) if key is not None else None
    if window is not None:
        seeds.append(_seeds.window(window) or _seeds.load_window(window))
    refusal = ledger_cache().reserve(seeds, nanos, nanos if bounded else 0)
    return refusal or Hold(tuple(seed.account for seed in seeds), nanos)


async def release_job(hold: Hold, charged: int) -> None:
    """A queued call ended: its charge (if any) is already in the database with its job."""
    for account, reserved, recorded in _moves(hold, charged, written=True):
        await ledger_cache().amove(account, reserved=reserved, recorded=recorded)


def release_job_now(hold: Hold, charged: int) -> None:
    """Sync twin of :func:`release_job`."""
    for account, reserved, recorded in _moves(hold, charged, written=True):
        ledger_cache().move(account, reserved=reserved, recorded=recorded)


def written(records: Iterable[tuple[int, int, str]]) -> None:
    """Charges (user, nano-credits, recording process) are in the database: the balance holds them.

    One move per user, of what their records add up to, all in one round trip: the same as one
    move per record, since these moves only lower the account and it stops at zero either way."""
    cache = ledger_cache()
    # In memory only this process's own records were ever recorded; in Redis every process's were.
    anyone = not isinstance(cache, MemoryCache)
    totals: dict[int, int] = {}
    for user_id, nanos, process in records:
        if nanos and (anyone or process == PROCESS):
            totals[user_id] = totals.get(user_id, 0) + nanos
    cache.moves([(user_account(user_id), 0, -nanos) for user_id, nanos in totals.items()])
