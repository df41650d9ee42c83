from secure_ws import issue_token

token = issue_token("alice", scope="subscribe:room.* chat:write", ttl="15m", claims={"plan": "pro"})
