from secure_ws import SecureWS

api = SecureWS()

api.channels("room.vip.*", history_size=500)                  # first: room.vip.x gets 500, not room.*'s 50
api.channels("room.*", history_size=50, history_ttl="10m", presence=True, join_leave=True, client_publish=True)
api.channels("feed.*", client_publish=False)                  # only the server side publishes here
api.channels("ticker.*", history_size=0, presence=False, join_leave=False)
