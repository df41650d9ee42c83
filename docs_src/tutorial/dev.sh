secure-ws dev
