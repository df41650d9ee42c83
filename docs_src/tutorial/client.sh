export TOKEN=$(secure-ws token issue --sub alice --scope "notes:write")
python client.py
