from django.dispatch import Signal

# Sent (on commit) when a user's balance moves from > 0 to <= 0 or back: the gateway's auth
# snapshot holds "has credits" per user and must be rebuilt.
balance_sign_changed = Signal()
