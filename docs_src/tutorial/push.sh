export KEY=$(secure-ws apikey create backend)
python push.py
