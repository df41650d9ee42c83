app = Starlette(routes=[Mount("/realtime", app=api.app)], lifespan=api.lifespan)

@contextlib.asynccontextmanager
async def lifespan(app):                 # FastAPI, or any host with its own lifespan
    async with api.lifespan(app):
        yield

app = FastAPI(lifespan=lifespan)
app.mount("/realtime", api.app)
