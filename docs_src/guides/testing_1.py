from secure_ws.client import RequestError
from secure_ws.testing import TestServer
from myapp import api

async def test_create_order():
    async with TestServer(api) as server:            # memory storage, its own fresh key
        async with server.connect(sub="alice", scope="orders:write") as ws:
            assert await ws.call("orders.create", {"items": [1]}) == {"order_id": 42}
            with pytest.raises(RequestError) as e:
                await ws.call("orders.create", {})
            assert e.value.code == "empty_order"
