"""Credit grants and removals (through billing.services, into the append-only ledger), balances, the ledger."""

# No `from __future__ import annotations`: django-ninja reads the views' annotations at run time.
from datetime import datetime
from decimal import Decimal

from django.db.models import F, QuerySet, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from ninja import Router, Schema, Status
from ninja.pagination import LimitOffsetPagination, paginate
from pydantic import Field

from accounts.models import User
from billing.models import Balance, CreditTransaction, TransactionKind
from billing.services import grant_credits, remove_credits
from management_api.auth import ApiRequest, permits
from management_api.errors import ApiError
from management_api.schemas import Amount, Credits, get_or_404

credits = Router(tags=["credits and balances"])


class TransactionOut(Schema):
    id: int
    user_id: int
    kind: TransactionKind
    amount: Credits = Field(description="Always positive: the kind gives the sign.")
    signed_amount: Credits = Field(description="What it did to the balance.")
    description: str
    tier: str
    source_id: str = Field(description="One ledger row per source: a request id, or a grant's idempotency key.")
    created_by_id: int | None
    created_at: datetime


class CreditsIn(Schema):
    amount: Amount = Field(description='Credits, as a string ("100", "0.5"): at most 9 decimals.')
    description: str = Field("", max_length=500, description="Recorded in the ledger.")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Sent again, the same key posts nothing more: the earlier entry is answered.",
    )


class CreditsMoved(Schema):
    transaction: TransactionOut
    balance: Credits = Field(description="The user's balance after it.")


class BalanceOut(Schema):
    user_id: int
    username: str
    balance: Credits
    updated_at: datetime | None = Field(description="None for a user who never had a ledger entry (balance 0).")

    @staticmethod
    def resolve_user_id(user: User) -> int:
        return user.pk

    @staticmethod
    def resolve_balance(user: User) -> Decimal:
        return user.balance_amount or Decimal(0)  # type: ignore[attr-defined]

    @staticmethod
    def resolve_updated_at(user: User) -> datetime | None:
        return user.balance_updated_at  # type: ignore[attr-defined, no-any-return]


def balance_rows() -> QuerySet[User]:
    return User.objects.annotate(balance_amount=F("balance__amount"), balance_updated_at=F("balance__updated_at"))


def balance_of(user: User) -> Decimal:
    return Balance.objects.amount_of(user)


def move_credits(request: ApiRequest, user_id: int, payload: CreditsIn, kind: str) -> Status[CreditsMoved]:
    user = get_or_404(User.objects.all(), user_id, "user")
    source_id = f"{kind}:{payload.idempotency_key}" if payload.idempotency_key else None
    options = {"description": payload.description, "source_id": source_id, "created_by": request.auth}
    if kind == TransactionKind.ADMIN_GRANT:
        entry = grant_credits(user, payload.amount, **options)  # type: ignore[arg-type]
    else:
        entry = remove_credits(user, payload.amount, **options)  # type: ignore[arg-type]
    status = 201
    if entry is None:  # the key was posted before: answer that entry, if it is this one
        entry = CreditTransaction.objects.get(source_id=source_id)
        if entry.user_id != user.pk or entry.amount != payload.amount:
            raise ApiError(
                409,
                "This idempotency key was used for another user or amount.",
                param="idempotency_key",
                code="conflict",
            )
        status = 200
    return Status(status, CreditsMoved(transaction=TransactionOut.from_orm(entry), balance=balance_of(user)))


@credits.post(
    "/users/{user_id}/credit-grants", response={200: CreditsMoved, 201: CreditsMoved}, summary="Grant credits"
)
@permits("billing.add_credittransaction")
def grant(request: ApiRequest, user_id: int, payload: CreditsIn) -> Status[CreditsMoved]:
    """An `admin_grant` ledger entry; the balance moves with it, in one transaction."""
    return move_credits(request, user_id, payload, TransactionKind.ADMIN_GRANT)


@credits.post(
    "/users/{user_id}/credit-removals", response={200: CreditsMoved, 201: CreditsMoved}, summary="Remove credits"
)
@permits("billing.add_credittransaction")
def remove(request: ApiRequest, user_id: int, payload: CreditsIn) -> Status[CreditsMoved]:
    """An `admin_removal` ledger entry. The balance may go negative."""
    return move_credits(request, user_id, payload, TransactionKind.ADMIN_REMOVAL)


@credits.get("/users/{user_id}/transactions", response=list[TransactionOut], summary="A user's ledger, newest first")
@paginate(LimitOffsetPagination)
@permits("billing.view_credittransaction")
def list_transactions(request: HttpRequest, user_id: int, kind: TransactionKind | None = None) -> object:
    rows = get_or_404(User.objects.all(), user_id, "user").credit_transactions.order_by("-created_at", "-id")
    return rows if kind is None else rows.filter(kind=kind)


@credits.get("/users/{user_id}/balance", response=BalanceOut, summary="A user's balance")
@permits("billing.view_balance")
def get_balance(request: HttpRequest, user_id: int) -> User:
    return get_or_404(balance_rows(), user_id, "user")


@credits.get("/balances", response=list[BalanceOut], summary="Every user's balance, lowest first")
@paginate(LimitOffsetPagination)
@permits("billing.view_balance")
def list_balances(request: HttpRequest) -> QuerySet[User]:
    return balance_rows().order_by(Coalesce("balance_amount", Value(Decimal(0))), "id")
