export TOKEN=$(secure-ws token issue --sub alice --scope "notes:write subscribe:notes.*")
python client.py
