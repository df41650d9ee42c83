secure-ws dev app:api
