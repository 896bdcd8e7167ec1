from django.dispatch import Signal

# Sent on commit whenever a user's balance moves, with user_id, version and amount: the gateway's
# credit admission keeps the newest balance it has seen of each user (gateway.budget).
balance_changed = Signal()
