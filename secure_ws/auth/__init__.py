"""Who a client is and what it may do: token verification, keys, revocations, scopes."""
